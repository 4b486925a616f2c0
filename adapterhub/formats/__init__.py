"""Readers and writers of adapter directories: PEFT, the ``adapters`` library, and adapterhub's own.

Both libraries name their config ``adapter_config.json`` with different schemas; :func:`detect`
tells them apart by content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from adapterhub.adapter import Adapter
from adapterhub.errors import MissingFileError, UnknownFormatError
from adapterhub.formats import adapters_lib, native, peft
from adapterhub.formats._files import read_json
from adapterhub.paths import shown

FormatName = Literal["peft", "adapters", "adapterhub"]
FORMATS: tuple[str, ...] = ("peft", "adapters", "adapterhub")


def detect(path: str | Path) -> str:
    """Which format a directory holds: ``"peft"``, ``"adapters"`` or ``"adapterhub"``.

    Raises:
        MissingFileError: the path does not exist.
        UnknownFormatError: it holds no recognised adapter, saying what it found instead.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{shown(path)} does not exist.\n  fix: check the path (an adapter is a directory "
                               "holding adapter_config.json).", path=path)
    if not path.is_dir():
        raise UnknownFormatError(
            f"{shown(path)} is a file.\n  fix: pass the adapter's directory (the one holding adapter_config.json).",
            path=path)
    if native.is_native_dir(path):
        return "adapterhub"
    cfg_path = path / peft.CONFIG_NAME
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if peft.is_peft_config(cfg):
            return "peft"
        if adapters_lib.is_adapters_config(cfg):
            return "adapters"
        raise UnknownFormatError(
            f"{shown(cfg_path)} is neither a PEFT config (no 'peft_type') nor an `adapters` library config "
            "(no 'config' + 'model_class').\n  fix: pass a directory saved by PEFT (save_pretrained) or the "
            "`adapters` library (save_adapter).", path=cfg_path)
    nested = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / peft.CONFIG_NAME).is_file())
    if nested:
        raise UnknownFormatError(
            f"{shown(path)} holds several adapters ({', '.join(nested)}).\n  fix: pass one of them, e.g. "
            f"{shown(path / nested[0])}.", path=path)
    raise UnknownFormatError(
        f"{shown(path)} holds no adapter: expected adapter_config.json (PEFT or `adapters` library) or "
        "adapterhub.json.\n  fix: pass the directory the adapter was saved to.", path=path)


def read_adapter(path: str | Path, *, format: str | None = None, allow_pickle: bool = False) -> Adapter:
    """Read an adapter directory in any supported format (detected unless given).

    Example:
        >>> adapter = read_adapter("my-lora")          # doctest: +SKIP
        >>> adapter.kind, adapter.spec.r               # doctest: +SKIP
        ('lora', 16)
    """
    fmt = format or detect(path)
    if fmt == "peft":
        return peft.read(path, allow_pickle=allow_pickle)
    if fmt == "adapters":
        return adapters_lib.read(path, allow_pickle=allow_pickle)
    if fmt == "adapterhub":
        return native.read(path)
    raise UnknownFormatError(f"unknown format {fmt!r}.\n  fix: choose one of {', '.join(FORMATS)}.")


def write_adapter(adapter: Adapter, path: str | Path, *, format: str = "peft", overwrite: bool = False,
                  **options: Any) -> Path:
    """Write an adapter directory in ``format``; ``options`` go to that format's writer."""
    if format == "peft":
        return peft.write(adapter, path, overwrite=overwrite)
    if format == "adapters":
        return adapters_lib.write(adapter, path, overwrite=overwrite, **options)
    if format == "adapterhub":
        return native.write(adapter, path, overwrite=overwrite)
    raise UnknownFormatError(f"unknown format {format!r}.\n  fix: choose one of {', '.join(FORMATS)}.")


__all__ = ["FORMATS", "detect", "read_adapter", "write_adapter"]
