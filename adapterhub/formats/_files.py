"""File helpers shared by the format readers and writers: JSON configs, weight files, atomic dirs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import (
    AdapterHubError,
    CorruptFileError,
    FormatError,
    MissingFileError,
    OutputPathError,
    PickleRefusedError,
    storage_error,
)
from adapterhub.paths import check_output, dir_mode, shown
from adapterhub.tensorfile import TensorInfo, read_header

if TYPE_CHECKING:
    import torch


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise MissingFileError(f"{path} does not exist.", path=path) from e
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path} is not UTF-8 text: {e}", path=path) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{path} is not valid JSON ({e}).\n  fix: restore the file from the adapter's source.", path=path
        ) from e
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} must hold a JSON object, not {type(data).__name__}.", path=path)
    return data


def dump_json(data: dict[str, Any]) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def load_weights(
    directory: Path, safetensors_name: str, pickle_names: tuple[str, ...], *, allow_pickle: bool
) -> tuple[dict[str, TensorInfo | torch.Tensor], dict[str, str]]:
    """Entries of the directory's weights file (safetensors headers, or tensors from an allowed
    pickle) and the safetensors metadata (empty for a pickle).

    Raises:
        PickleRefusedError: only a pickle file exists and ``allow_pickle`` is false.
        MissingFileError: no weights file at all.
    """
    st = directory / safetensors_name
    if st.is_file():
        header = read_header(st)
        return dict(header.tensors), header.metadata
    for name in pickle_names:
        pk = directory / name
        if pk.is_file():
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{pk} is a pickle file; pickles can run arbitrary code when loaded, so adapterhub "
                    f"does not load them by default.\n"
                    f"  fix: if you trust its source, pass --allow-pickle (Python: allow_pickle=True); it is "
                    f"then read with torch.load(weights_only=True), which loads tensors only. Better, convert "
                    f"it once to {safetensors_name}.", path=pk)
            return _load_pickle(pk), {}
    raise MissingFileError(
        f"{directory} has no weights file: expected {safetensors_name}"
        + (f" (or, with --allow-pickle, {' / '.join(pickle_names)})" if pickle_names else "") + ".",
        path=directory / safetensors_name)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CorruptFileError(
            f"{path} could not be loaded with torch.load(weights_only=True): {str(e).splitlines()[0]}\n"
            "  fix: the file is damaged or holds objects other than tensors; it will not be loaded "
            "with full pickle support. Re-export it as safetensors.", path=path) from e
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise CorruptFileError(f"{path} does not hold a flat name -> tensor dict.", path=path)
    return data


def check_directory_target(target: str | Path, *, overwrite: bool = False) -> Path:
    """What :func:`atomic_directory` checks before it creates anything (call it early to fail before
    long work): the output-path guard (:func:`adapterhub.paths.check_output`), and an existing
    non-empty ``target`` only with ``overwrite``.

    Raises:
        OutputPathError: the guard refused the path, or it is a file.
        FormatError: it exists and is not empty, and ``overwrite`` is false.
    """
    target = check_output(target, replace=overwrite)
    try:
        if target.exists() and not target.is_dir():
            raise OutputPathError(f"{shown(target)} is a file, not a directory; adapterhub writes a directory there.\n"
                                  "  fix: choose a directory path (a file is never replaced by one).", path=target)
        occupied = target.exists() and not (target.is_dir() and not any(target.iterdir()))
    except OSError as e:
        raise storage_error(e, f"looking at {target}", str(target)) from e
    if occupied and not overwrite:
        raise FormatError(
            f"{target} already exists and is not empty.\n  fix: choose a new directory, or pass "
            "overwrite=True (CLI: --force) to replace it.", path=target)
    return target


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it is renamed to ``target``.

    The target is checked first (:func:`check_directory_target`). The finished directory follows
    the umask (folders 0755, files 0644 under 022), not the 0700/0600 of temp files; hard-linked
    files (``pull --link``) keep their mode.
    On any exception the temporary directory is removed and ``target`` is untouched; an OSError
    becomes a :class:`StorageError` that names the target and what to do.
    """
    target = check_directory_target(target, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise storage_error(e, f"creating {target}", str(target.parent)) from e
    try:
        yield tmp
        dmode = dir_mode()
        fmode = dmode & 0o666
        for p in tmp.rglob("*"):
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, dmode)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink == 1:  # ours (some writers create 0600); a hard link shares a registry blob's mode
                    os.chmod(p, fmode)
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, dmode)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_symlink():  # the target was a link to a directory: the link is replaced, not what it names
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, AdapterHubError):
            raise storage_error(e, f"writing {target}" + (f" ({e.filename})" if e.filename else ""),
                                str(target.parent)) from e
        raise
