"""Which files of a directory a push stores: what an adapter directory is, and nothing else unless asked.

An adapter directory is (top level only):

=================  ==================================================================================
adapter config     ``adapter_config.json`` (PEFT, ``adapters``), ``adapterhub.json``, ``head_config.json``
weights            the detected format's: ``adapter_model.safetensors`` (PEFT), ``adapter.safetensors`` and
                   ``model_head.safetensors`` (``adapters``), ``adapter.safetensors`` (adapterhub); with
                   ``allow_pickle`` also ``adapter_model.bin`` / ``pytorch_adapter.bin`` /
                   ``pytorch_model_head.bin``
model card         ``README``, ``README.md``, ``README.txt``, ``README.rst`` (any case)
tokenizer          ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
                   ``added_tokens.json``, ``vocab.json``, ``vocab.txt``, ``merges.txt``, ``tokenizer.model``,
                   ``spiece.model``, ``sentencepiece.bpe.model``
templates          ``generation_config.json``, ``chat_template.jinja``, ``chat_template.json``,
                   ``additional_chat_templates/*.jinja``
=================  ==================================================================================

Anything else (training checkpoints, optimizer states, logs, notes) is left out and listed; ``include``
globs (or ``include_all``) store more. Pickles (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``,
``*.ckpt``) are stored only with ``allow_pickle``, whatever the globs say. Hidden entries are never
stored unless a glob names them (hidden directories are not entered). A symbolic link that leaves the
directory is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from adapterhub.errors import PickleRefusedError, RegistryError
from adapterhub.formats._files import confined

ADAPTER_CONFIGS = ("adapter_config.json", "adapterhub.json", "head_config.json")
WEIGHTS = {
    "peft": ("adapter_model.safetensors",),
    "adapters": ("adapter.safetensors", "model_head.safetensors"),
    "adapterhub": ("adapter.safetensors",),
}
PICKLE_WEIGHTS = {
    "peft": ("adapter_model.bin",),
    "adapters": ("pytorch_adapter.bin", "pytorch_model_head.bin"),
    "adapterhub": (),
}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
TEMPLATES = ("generation_config.json", "chat_template.jinja", "chat_template.json")
TEMPLATE_GLOBS = ("additional_chat_templates/*.jinja",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_README = re.compile(r"readme(\.(md|txt|rst))?", re.IGNORECASE)


@dataclass(frozen=True)
class LeftOut:
    """A file (or a whole directory, path ending in ``/``) a push did not store, and why: ``not an adapter
    file``, ``pickle``, ``hidden``, ``directory of N file(s)``, ``linked directory, not followed`` or
    ``not a regular file``."""

    path: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """The files a push stores (paths relative to the directory, sorted) and what it left out."""

    files: tuple[str, ...]
    left_out: tuple[LeftOut, ...]


def is_pickle(rel: str) -> bool:
    """True for file names that hold (or usually hold) Python pickles."""
    return rel.lower().endswith(PICKLE_SUFFIXES)


def is_adapter_file(rel: str, fmt: str, *, allow_pickle: bool = False) -> bool:
    """True when ``rel`` is part of an adapter directory of format ``fmt`` (see the module's table)."""
    if "/" in rel:
        return any(fnmatchcase(rel, g) for g in TEMPLATE_GLOBS)
    return (rel in ADAPTER_CONFIGS or rel in WEIGHTS.get(fmt, ()) or rel in TOKENIZER or rel in TEMPLATES
            or bool(_README.fullmatch(rel)) or (allow_pickle and rel in PICKLE_WEIGHTS.get(fmt, ())))


def select_files(directory: str | Path, fmt: str, *, include: tuple[str, ...] | list[str] = (),
                 include_all: bool = False, allow_pickle: bool = False) -> Selection:
    """Choose the files of ``directory`` a push stores.

    Args:
        fmt: the directory's detected format (``peft``, ``adapters``, ``adapterhub``).
        include: extra globs matched against the relative POSIX path (``logs/*.json``).
        include_all: store every file except hidden ones and (without ``allow_pickle``) pickles.
        allow_pickle: pickles may be stored (the format's pickle weights, and any a glob names).

    Raises:
        UnsafeLinkError: a file to store is a symbolic link leaving the directory.
        PickleRefusedError: an ``include`` glob names a pickle and ``allow_pickle`` is false.
        RegistryError: nothing to store.
    """
    root = Path(directory)
    files: list[str] = []
    left: list[LeftOut] = []
    for rel, kind in _entries(root):
        named = any(fnmatchcase(rel, g) for g in include)
        if kind == "dirlink":
            left.append(LeftOut(rel + "/", "linked directory, not followed"))
            continue
        if kind == "hiddendir":
            left.append(LeftOut(rel + "/", "hidden"))
            continue
        if kind == "special":
            left.append(LeftOut(rel, "not a regular file"))
            continue
        if kind == "broken":
            left.append(LeftOut(rel, "broken symbolic link"))
            continue
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if is_adapter_file(rel, fmt, allow_pickle=allow_pickle) and not hidden:
            wanted = True
        elif named:
            wanted = True
        elif include_all and not hidden:
            wanted = True
        else:
            wanted = False
        if wanted and is_pickle(rel) and not allow_pickle:
            if named:
                raise PickleRefusedError(
                    f"{root / rel} matches --include but is a pickle; pickles can run arbitrary code when "
                    "loaded, so push stores them only when asked.\n  fix: pass --allow-pickle as well if you "
                    "trust the file (Python: allow_pickle=True).", path=root / rel)
            left.append(LeftOut(rel, "pickle"))
            continue
        if not wanted:
            left.append(LeftOut(rel, "hidden" if hidden else "pickle" if is_pickle(rel) else "not an adapter file"))
            continue
        confined(root / rel, root)
        files.append(rel)
    if not files:
        raise RegistryError(f"{root} has no files to push.\n  fix: pass the adapter's directory (the one holding "
                            "adapter_config.json).")
    return Selection(tuple(sorted(files)), tuple(_fold_dirs(left, files)))


def _entries(root: Path) -> list[tuple[str, str]]:
    """(relative path, "file" | "dirlink" | "hiddendir" | "special" | "broken") below ``root``, sorted; links to
    files count as files, links to nothing (or looping) are "broken"; hidden and linked directories are not
    entered."""
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if (base / d).is_symlink():
                out.append(((base / d).relative_to(root).as_posix(), "dirlink"))
            elif d.startswith("."):
                out.append(((base / d).relative_to(root).as_posix(), "hiddendir"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            p = base / f
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() and not p.exists():
                out.append((rel, "broken"))  # a link to nothing (or a loop): nothing to store
            elif p.is_file():
                out.append((rel, "file"))
            else:
                out.append((rel, "special"))
    return sorted(out)


def _fold_dirs(left: list[LeftOut], stored: list[str]) -> list[LeftOut]:
    """Report a top-level directory none of whose files is stored as one entry (``checkpoint-500/``)."""
    used_dirs = {s.split("/", 1)[0] for s in stored if "/" in s}
    out: list[LeftOut] = []
    folded: dict[str, int] = {}
    for item in left:
        top, sep, _ = item.path.partition("/")
        if sep and top not in used_dirs and not item.path.endswith("/"):
            folded[top] = folded.get(top, 0) + 1
        else:
            out.append(item)
    for top, n in folded.items():
        out.append(LeftOut(f"{top}/", f"directory of {n} file(s)"))
    return sorted(out, key=lambda x: x.path)
