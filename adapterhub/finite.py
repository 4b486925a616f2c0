"""NaN/Inf in adapter weights: found from the raw bytes, without importing torch.

A floating-point value is NaN or infinite exactly when its exponent bits are all ones (IEEE 754
float64/32/16, bfloat16, float8 e5m2); float8 e4m3 has no infinity and one NaN pattern per sign,
the ``fnuz`` float8 formats one NaN (``0x80``). So a scan is a mask and a compare over the tensor's
bytes, read in pieces of at most ``CHUNK_BYTES``: memory stays small whatever the adapter's size.

Two ways to do it, with the same results: numpy when it is already imported or a tensor is at least
``NUMPY_FROM_BYTES``, else the standard library alone: two ``bytes.count`` over the top byte of each
value settle almost every piece (finite weights never have it at 0x7f/0xff), the exact test runs only
where they do not. A 76 MiB bf16 adapter scans in under 0.1 s that way, with no import to pay (numpy's
alone is ~0.1 s); bench/finite_scan.py measures it.
In-memory tensors (the results of a blend) are scanned with torch, which they already need.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import CorruptFileError, NonFiniteError
from adapterhub.tensorfile import TensorInfo

if TYPE_CHECKING:
    from adapterhub.adapter import Adapter

#: bytes read per piece of a tensor
CHUNK_BYTES = 16 << 20
#: tensors at least this large are scanned with numpy even when it is not imported yet (if installed)
NUMPY_FROM_BYTES = 64 << 20

# safetensors dtype -> (bytes per element, mask, value of (bits & mask) that means NaN/Inf)
_PATTERNS: dict[str, tuple[int, int, int]] = {
    "F64": (8, 0x7FF0000000000000, 0x7FF0000000000000),
    "F32": (4, 0x7F800000, 0x7F800000),
    "F16": (2, 0x7C00, 0x7C00),
    "BF16": (2, 0x7F80, 0x7F80),
    "F8_E5M2": (1, 0x7C, 0x7C),
    "F8_E4M3": (1, 0x7F, 0x7F),
    "F8_E4M3FNUZ": (1, 0xFF, 0x80),
    "F8_E5M2FNUZ": (1, 0xFF, 0x80),
    "F8_E8M0": (1, 0xFF, 0xFF),
}


def _table(mask: int, match: int) -> bytes:
    return bytes(1 if (b & mask) == match else 0 for b in range(256))


# The standard-library scan looks at the (little-endian) exponent bytes only: for each dtype, the
# exponent lies in the top byte and possibly the bit(s) below it in the next byte:
# dtype -> ((byte offset in the element, translate table), ...) that must all give 1.
_BYTE_TESTS: dict[str, tuple[tuple[int, bytes], ...]] = {
    "F64": ((7, _table(0x7F, 0x7F)), (6, _table(0xF0, 0xF0))),
    "F32": ((3, _table(0x7F, 0x7F)), (2, _table(0x80, 0x80))),
    "F16": ((1, _table(0x7C, 0x7C)),),
    "BF16": ((1, _table(0x7F, 0x7F)), (0, _table(0x80, 0x80))),
    **{dt: ((0, _table(mask, match)),) for dt, (size, mask, match) in _PATTERNS.items() if size == 1},
}


def _count_bytes(data: bytes, dtype: str) -> int:
    size = _PATTERNS[dtype][0]
    tests = _BYTE_TESTS[dtype]
    if len(tests) == 1:
        offset, table = tests[0]
        return data[offset::size].translate(table).count(1)
    # float64/32, bfloat16: the top byte must be 0x7f or 0xff (exponent's high bits all ones, values >= 2**127 or
    # so); finite weights almost never have that, so two counts over the top bytes settle most pieces
    top = data[tests[0][0]::size]
    if not top.count(0x7F) and not top.count(0xFF):
        return 0
    hits = [top.translate(tests[0][1]), data[tests[1][0]::size].translate(tests[1][1])]
    both = int.from_bytes(hits[0], "little") & int.from_bytes(hits[1], "little")
    return both.bit_count()  # each element is one byte holding 0 or 1


def _count_numpy(data: bytes, dtype: str) -> int:
    import numpy as np

    size, mask, match = _PATTERNS[dtype]
    uint = {8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}[size]
    bits = np.frombuffer(data, dtype=uint) & uint(mask)
    return int(np.count_nonzero(bits == uint(match)))


def _use_numpy(nbytes: int) -> bool:
    if "numpy" in sys.modules:
        return True
    if nbytes < NUMPY_FROM_BYTES:
        return False
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def count_in_file(info: TensorInfo, *, backend: str | None = None) -> int:
    """How many values of a file-backed tensor are NaN or infinite (0 for non-float dtypes).

    ``backend`` forces ``"numpy"`` or ``"stdlib"`` (tests compare them); by default the faster available.
    """
    pattern = _PATTERNS.get(info.dtype)
    if pattern is None or info.nbytes == 0:
        return 0
    size = pattern[0]
    use_numpy = _use_numpy(info.nbytes) if backend is None else backend == "numpy"
    count = _count_numpy if use_numpy else _count_bytes
    step = max(size, CHUNK_BYTES - CHUNK_BYTES % size)
    remaining, bad = info.nbytes, 0
    with open(info.path, "rb") as f:
        f.seek(info.start)
        while remaining:
            data = f.read(min(step, remaining))
            if not data or len(data) % size:
                raise CorruptFileError(f"{info.path} ended inside tensor '{info.name}'.\n  fix: the file changed "
                                       "or is damaged since it was opened; re-download it.", path=info.path)
            bad += count(data, info.dtype)
            remaining -= len(data)
    return bad


def count_in_tensor(t: Any) -> int:
    """How many values of an in-memory torch tensor are NaN or infinite."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if t.element_size() == 1:  # float8: few CPU kernels
        t = t.to(torch.float32)
    return int((~torch.isfinite(t)).sum())


def scan(tensors: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, int]:
    """Tensor name -> number of NaN/Inf values, for the tensors that have any.

    ``tensors`` is an :class:`adapterhub.adapter.Tensors` (file-backed entries are scanned from their
    bytes, never loaded as tensors) or a plain name -> tensor mapping.
    """
    entry = getattr(tensors, "entry", None)
    out: dict[str, int] = {}
    for name in tensors if names is None else names:
        e = entry(name) if entry is not None else tensors[name]
        n = count_in_file(e) if isinstance(e, TensorInfo) else count_in_tensor(e)
        if n:
            out[name] = n
    return out


def scan_adapter(adapter: Adapter) -> dict[str, int]:
    """Every tensor of ``adapter`` holding NaN/Inf, with its count."""
    return scan(adapter.tensors)


def describe(counts: Mapping[str, int], limit: int = 3) -> str:
    """``"a.lora_A (2 values), b.lora_B (1 value) and 3 more"``."""
    items = sorted(counts.items())
    parts = [f"{n} ({c} value{'s' if c != 1 else ''})" for n, c in items[:limit]]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(parts) + more


def ensure_finite(adapter: Adapter, *, label: str | None = None) -> None:
    """Raise :class:`NonFiniteError` if any tensor of ``adapter`` holds NaN or Inf.

    Reads every byte of the adapter's weights once (no torch; see the module docstring for the speed).
    """
    counts = scan_adapter(adapter)
    if counts:
        raise non_finite_error(counts, label or str(adapter.source or adapter.name or "adapter"),
                               path=adapter.source)


_FIX = ("the adapter's weights are broken (training diverged or the file was damaged); re-export them from a good "
        "checkpoint")


def non_finite_error(counts: Mapping[str, int], label: str, *, path: str | Path | None = None,
                     fix: str = _FIX) -> NonFiniteError:
    """The error for NaN/Inf found in an adapter's tensors."""
    total = sum(counts.values())
    return NonFiniteError(
        f"{label}: {total} NaN/Inf value(s) in {len(counts)} tensor(s): {describe(counts)}.\n"
        f"  fix: {fix}. Nothing was written.", path=path, where=min(counts), counts=dict(counts))


__all__ = ["CHUNK_BYTES", "count_in_file", "count_in_tensor", "describe", "ensure_finite", "non_finite_error",
           "scan", "scan_adapter"]
