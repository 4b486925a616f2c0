"""adapterhub's own directory format: ``adapterhub.json`` (kind, spec, base) + ``adapter.safetensors``.

Tensors are stored under their canonical names, so any adapter adapterhub can read is stored
without loss, whatever format it came from; the registry keeps adapters in this form.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from adapterhub.adapter import SPEC_TYPES, Adapter, BaseModelRef, Spec, Tensors, check_layout
from adapterhub.errors import CorruptFileError, InvalidValueError
from adapterhub.formats._files import atomic_directory, dump_json, load_weights, read_json
from adapterhub.formats.peft import with_fix
from adapterhub.tensorfile import save_tensors

CONFIG_NAME = "adapterhub.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1
_TUPLE_FIELDS = {"target_modules", "feedforward_modules", "modules_to_save"}


def is_native_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """A JSON-ready dict of a spec (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}


def spec_from_dict(kind: str, data: dict[str, Any]) -> Spec:
    """Rebuild a spec from :func:`spec_to_dict` output; unknown keys are an error."""
    cls = SPEC_TYPES[kind]
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {kind} spec field(s): {', '.join(sorted(unknown))}")
    args = {k: (tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v) for k, v in data.items()}
    return cls(**args)


def describe(adapter: Adapter) -> dict[str, Any]:
    """The ``adapterhub.json`` document for an adapter."""
    return {
        "format": "adapterhub", "format_version": FORMAT_VERSION, "kind": adapter.kind, "name": adapter.name,
        "base": asdict(adapter.base), "spec": spec_to_dict(adapter.spec), "extra": adapter.extra,
    }


def read(path: str | Path) -> Adapter:
    """Read an adapterhub directory."""
    path = Path(path)
    doc = read_json(path / CONFIG_NAME)
    if doc.get("format") != "adapterhub" or doc.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(
            f"{path / CONFIG_NAME} is not an adapterhub v{FORMAT_VERSION} document "
            f"(format={doc.get('format')!r}, format_version={doc.get('format_version')!r}).\n"
            "  fix: upgrade adapterhub if it was written by a newer version.", path=path)
    try:
        kind = doc["kind"]
        spec = spec_from_dict(kind, doc["spec"])
        base = BaseModelRef(**doc.get("base") or {})
    except InvalidValueError as e:
        e.args = (with_fix(f"{path / CONFIG_NAME}: {e}"),)
        e.path = path / CONFIG_NAME
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{path / CONFIG_NAME}: invalid document ({e}).\n  fix: restore the directory from "
                               "where it was written (pull it again, or rerun the blend).", path=path) from e
    entries, _ = load_weights(path, WEIGHTS_NAME, (), allow_pickle=False)
    adapter = Adapter(kind=kind, spec=spec, tensors=Tensors(entries), base=base, name=doc.get("name"),
                      extra=doc.get("extra") or {}, source=path)
    check_layout(adapter)
    return adapter


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an adapter as an adapterhub directory (atomically)."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(dump_json(describe(adapter)), encoding="utf-8")
        save_tensors(adapter.tensors.materialize(), tmp / WEIGHTS_NAME, {"format": "pt"})
    return path
