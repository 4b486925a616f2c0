"""Convert an adapter directory from one format to another, checked against a base when given."""

from __future__ import annotations

from pathlib import Path

from adapterhub.adapter import Adapter
from adapterhub.base import BaseCheckpoint
from adapterhub.compose.checks import Report, check_adapter
from adapterhub.errors import UnsupportedAdapterError
from adapterhub.formats import adapters_lib, read_adapter, write_adapter
from adapterhub.formats._files import check_directory_target
from adapterhub.paths import reading


def model_root(base: BaseCheckpoint) -> str:
    """The attribute path in front of the transformer stack (``"model."`` for Llama LMs, ``""`` for BertModel)."""
    for name in sorted(base.tensors):
        for marker in ("encoder.layer.", "layers.", "layer.", "h."):
            i = name.find(marker)
            if i == 0 or (i > 0 and name[i - 1] == "."):
                return name[:i]
    return ""


def with_base(adapter: Adapter, base: BaseCheckpoint) -> Adapter:
    """The adapter with the base's identity recorded: fingerprint, model type and architectures (its recorded
    name kept, else the base's)."""
    return adapter.replace(base=base.identity(adapter.base))


def convert_adapter(src: str | Path, out: str | Path, *, format: str = "peft", base: str | Path | None = None,
                    overwrite: bool = False, allow_pickle: bool = False) -> tuple[Path, Report | None]:
    """Read ``src`` (any format), check it against ``base`` if given, and write ``out`` in ``format``.

    With a base, the written adapter records the base's fingerprint, an ``adapters``-library
    prefix is materialised into PEFT's layout, and the ``adapters`` document gets the model class.

    ``out`` may not be, contain or lie inside ``src`` or ``base`` (nor the registry or the current
    directory): it is checked before anything is read.

    Raises:
        CompatibilityError: the adapter does not fit the base (the report is attached).
        UnsupportedAdapterError: the target format cannot hold this adapter exactly.
        OutputPathError, FormatError, StorageError: ``out`` cannot be written (nothing was).
    """
    with reading(src), reading(base, role="the base model this command reads"):
        check_directory_target(out, overwrite=overwrite)
        return _convert(src, out, format=format, base=base, overwrite=overwrite, allow_pickle=allow_pickle)


def _convert(src: str | Path, out: str | Path, *, format: str, base: str | Path | None, overwrite: bool,
             allow_pickle: bool) -> tuple[Path, Report | None]:
    adapter = read_adapter(src, allow_pickle=allow_pickle)
    report = None
    options: dict = {}
    if base is not None:
        ckpt = BaseCheckpoint.open(base)
        report = check_adapter(adapter, ckpt, subject=str(src))
        report.raise_for_errors()
        adapter = with_base(adapter, ckpt)
        if format == "adapters":
            archs = ckpt.config.get("architectures") or [None]
            options = {"model_class": archs[0], "model_type": ckpt.config.get("model_type"),
                       "hidden_size": ckpt.hidden_size, "prefix_key_root": model_root(ckpt)}
        if adapter.kind == "prefix" and adapter.spec.layout != "peft" and format == "peft":
            adapter = adapters_lib.prefix_to_peft(adapter, num_layers=ckpt.num_layers, num_kv_heads=ckpt.num_kv_heads)
    elif adapter.kind == "prefix" and adapter.spec.layout != "peft" and format == "peft":
        raise UnsupportedAdapterError(
            "converting an `adapters` library prefix to PEFT needs the base's layer and head counts: pass --base.")
    return write_adapter(adapter, out, format=format, overwrite=overwrite, **options), report
