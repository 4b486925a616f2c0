"""File helpers shared by the format readers and writers: JSON configs, weight files, atomic dirs.

Every file a reader opens goes through :func:`confined` first: a symbolic link that resolves outside
the adapter's folder is refused (a link to ``/etc/passwd`` named ``adapter_config.json`` must never be
read, stored or served). One exception is the layout of content-addressed caches, where a snapshot's
files link into the cache's own blob store: ``<cache>/snapshots/<rev>/<file> -> <cache>/blobs/<hash>``
(huggingface_hub's cache and adapterhub's registry both look like this).
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import _json
from adapterhub.errors import (
    AdapterHubError,
    CorruptFileError,
    FormatError,
    MissingFileError,
    OutputPathError,
    PickleRefusedError,
    UnsafeLinkError,
    storage_error,
)
from adapterhub.paths import check_output, check_replaceable, dir_mode, remove_dead_leftovers, shown, writer_tag
from adapterhub.tensorfile import TensorInfo, read_header

if TYPE_CHECKING:
    import torch

#: largest JSON config read (adapter and base configs are kilobytes; a sharded base's index a few MB)
MAX_JSON_BYTES = 64 * 1024 * 1024

_TRUSTED_ROOTS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("adapterhub_trusted_roots",
                                                                                  default=())


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextmanager
def links_allowed_into(folder: str | Path) -> Iterator[None]:
    """Within this block, links may also resolve into ``folder`` (a registry's blob store that a
    private snapshot links into)."""
    token = _TRUSTED_ROOTS.set((*_TRUSTED_ROOTS.get(), os.path.realpath(folder)))
    try:
        yield
    finally:
        _TRUSTED_ROOTS.reset(token)


def _cache_blobs(folder: str) -> str | None:
    """The blob store of the content-addressed cache ``folder`` is a snapshot of, if any:
    ``<cache>/blobs`` for ``<cache>/snapshots/<rev>[/sub...]`` (a real directory, not a link)."""
    parts = Path(folder).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots":
            blobs = Path(*parts[:i], "blobs")
            if blobs.is_dir() and not blobs.is_symlink():
                return str(blobs)
            return None
    return None


def confined(path: str | Path, folder: str | Path | None = None) -> Path:
    """``path`` if it resolves inside ``folder`` (default: its parent directory); links are followed.

    Raises:
        UnsafeLinkError: ``path`` (or a directory on the way) is a symbolic link that leaves the folder,
            naming the link and its target.
    """
    path = Path(path)
    real_folder = os.path.realpath(path.parent if folder is None else folder)
    real = os.path.realpath(path)
    if _inside(real, real_folder):
        return path
    allowed = [*_TRUSTED_ROOTS.get()]
    if (blobs := _cache_blobs(real_folder)) is not None:
        allowed.append(os.path.realpath(blobs))
    if any(_inside(real, root) for root in allowed):
        return path
    link = path
    top = Path(path.parent if folder is None else folder)
    for candidate in (path, *path.parents):  # name the link itself, not the file it ends at
        if candidate == top:
            break
        if candidate.is_symlink():
            link = candidate
            break
    target = os.readlink(link) if link.is_symlink() else real
    shown = folder if folder is not None else path.parent
    raise UnsafeLinkError(
        f"{link} is a symbolic link to {target}, outside the adapter folder {shown}; adapterhub does not "
        f"follow links that leave the folder.\n  fix: if the file belongs to the adapter, replace the link "
        f"by a copy of the file (cp --remove-destination {real} {link}).", path=link, target=real)


def parse_json_bytes(raw: bytes | str, path: Path, what: str = "") -> Any:
    """Parse JSON read from ``path`` with a bounded depth; errors name the file."""
    try:
        return _json.loads(raw)
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path} is not UTF-8 text: {e}\n  fix: restore the file from its source.",
                               path=path) from e
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{path}{what} is not valid JSON ({e}).\n  fix: restore the file from the adapter's source.", path=path
        ) from e
    except ValueError as e:  # nested too deep
        raise CorruptFileError(
            f"{path}{what} is {e}; no adapter or model config is.\n  fix: restore the file from the adapter's "
            "source; it is damaged or hostile.", path=path) from e


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with errors that name the file.

    Raises:
        MissingFileError: no such file.
        UnsafeLinkError: the file is a symbolic link leaving its folder.
        CorruptFileError: not UTF-8, not JSON, not an object, larger than :data:`MAX_JSON_BYTES` or
            nested deeper than :data:`adapterhub._json.MAX_DEPTH`.
    """
    path = Path(path)
    try:
        confined(path)
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            raise CorruptFileError(f"{path} is not a regular file.\n  fix: put the file itself there (a FIFO or "
                                   "device is never read).", path=path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise CorruptFileError(
                    f"{path} is {size:,} bytes, more than the {MAX_JSON_BYTES // 2**20} MiB a JSON config may "
                    "have.\n  fix: pass the adapter's own config file; this one is damaged or hostile.", path=path)
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError as e:
        raise MissingFileError(f"{path} does not exist.\n  fix: check the path, or restore the file.", path=path) from e
    except IsADirectoryError as e:
        raise CorruptFileError(f"{path} is a directory, not a JSON file.\n  fix: put the JSON file there instead.",
                               path=path) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path} is not UTF-8 text: {e}\n  fix: restore the file from its source.",
                               path=path) from e
    data = parse_json_bytes(text, path)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} must hold a JSON object, not {type(data).__name__}.\n  fix: restore the file "
                               "from its source (a config is a JSON object, {...}).", path=path)
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
    st = confined(directory / safetensors_name, directory)
    if st.is_file():
        header = read_header(st)
        return dict(header.tensors), header.metadata
    for name in pickle_names:
        pk = confined(directory / name, directory)
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
        + (f" (or, with --allow-pickle, {' / '.join(pickle_names)})" if pickle_names else "")
        + ".\n  fix: copy the adapter's weights file into the directory (save_pretrained writes it).",
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
        raise CorruptFileError(f"{path} does not hold a flat name -> tensor dict.\n  fix: re-export the adapter as "
                               "safetensors.", path=path)
    return data


def check_directory_target(target: str | Path, *, overwrite: bool = False) -> Path:
    """What :func:`atomic_directory` checks before it creates anything (call it early to fail before
    long work): the output-path guard (:func:`adapterhub.paths.check_output`), and an existing
    non-empty ``target`` only with ``overwrite`` and only if adapterhub could have written it
    (:func:`adapterhub.paths.check_replaceable`: an adapter or model directory, or a link).

    Raises:
        OutputPathError: the guard refused the path, it is a file, or it is a directory ``overwrite``
            may not replace (no adapter or model in it, a git work tree, a system folder).
        FormatError: it exists and is not empty, and ``overwrite`` is false.
    """
    target = check_output(target)
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
    if occupied:  # only a directory adapterhub could have written, and never one holding a registry
        check_replaceable(target)
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
        remove_dead_leftovers(target.parent)  # what killed runs left beside their outputs
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{writer_tag()}.", suffix=".tmp", dir=target.parent))
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
            old = target.with_name(f".{target.name}.old-{writer_tag()}.tmp")
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
