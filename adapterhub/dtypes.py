"""Safetensors dtype names <-> torch dtypes."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.cache
def _table() -> dict[str, torch.dtype]:
    import torch

    table = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
        "F64": torch.float64,
    }
    for st, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
        if hasattr(torch, attr):
            table[st] = getattr(torch, attr)
    return table


def st_to_torch(name: str) -> torch.dtype:
    """``"BF16"`` -> ``torch.bfloat16``.

    Raises:
        FormatError: this torch has no such dtype.
    """
    try:
        return _table()[name]
    except KeyError:
        from adapterhub.errors import FormatError

        raise FormatError(f"this torch build has no dtype for safetensors {name!r}.\n  fix: upgrade torch, or "
                          "convert the checkpoint to a supported dtype.") from None


def torch_to_st(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"BF16"``."""
    for k, v in _table().items():
        if v == dtype:
            return k
    raise KeyError(f"no safetensors name for {dtype}")
