"""Safetensors files seen through their headers: names, dtypes, shapes and byte ranges.

The header is parsed and checked against the file's real size before any tensor is touched, so a
truncated file or a header that lies about sizes is reported up front instead of failing (or
reading garbage) later. Tensors are read on demand through ``safetensors.safe_open`` (mmap).
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import _json
from adapterhub.errors import CorruptFileError, FormatError, MissingFileError

if TYPE_CHECKING:
    import torch

#: bytes per element of each safetensors dtype
DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
#: largest header accepted: safetensors' own limit (100 MB), about a million tensor entries
MAX_HEADER_BYTES = 100 * 1000 * 1000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, without its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; read no tensor data.

    Raises:
        MissingFileError: the file does not exist.
        CorruptFileError: the file is truncated, the header is not valid JSON, or the byte ranges
            it declares do not match the dtypes, shapes and the file's real size.
    """
    path = Path(path)
    fix = "re-download or re-export the file; it is damaged or was not written completely."
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not path.is_dir():  # a FIFO would block forever
            raise CorruptFileError(f"{path} is not a regular file.\n  fix: {fix}", path=path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptFileError(
                    f"{path} is not a safetensors file: it is {size} bytes, shorter than the 8-byte "
                    f"header length.\n  fix: {fix}", path=path)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES and 8 + n <= size:
                raise CorruptFileError(
                    f"{path} has a header of {n:,} bytes, more than the {MAX_HEADER_BYTES:,} safetensors allows "
                    f"(about a million tensors).\n  fix: {fix}", path=path)
            if 8 + n > size:
                raise CorruptFileError(
                    f"{path} is truncated or not a safetensors file: its header claims {n} bytes "
                    f"but the file has {size} bytes.\n  fix: {fix}", path=path)
            raw = f.read(n)
    except FileNotFoundError as e:
        raise MissingFileError(f"{path} does not exist.\n  fix: check the path, or restore the file.", path=path) from e
    except IsADirectoryError as e:
        raise CorruptFileError(f"{path} is a directory, not a safetensors file.\n  fix: put the weights file there "
                               "instead.", path=path) from e
    try:
        header = _json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(
            f"{path} has a header that is not valid JSON ({e}).\n  fix: {fix}", path=path) from e
    except ValueError as e:  # nested too deep
        raise CorruptFileError(
            f"{path} has a header {e}; a safetensors header is 3 levels deep.\n  fix: {fix}", path=path) from e
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path} has a header that is not a JSON object.\n  fix: {fix}", path=path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError(f"{path}: __metadata__ must map strings to strings.\n  fix: {fix}", path=path)
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, base, fix)
    # The data buffer must be covered exactly, without gaps or overlaps, and end at end of file.
    pos = base
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != pos:
            what = "overlaps another tensor" if info.start < pos else "leaves a gap before it"
            raise CorruptFileError(
                f"{path}: tensor '{info.name}' {what} (starts at byte {info.start - base}, "
                f"expected {pos - base}).\n  fix: {fix}", path=path)
        pos = info.end
    if pos != size:
        raise CorruptFileError(
            f"{path} is {'truncated' if pos > size else 'longer than its header says'}: the header "
            f"describes {pos} bytes, the file has {size}.\n  fix: {fix}", path=path)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=dict(metadata), file_size=size)


def _check_entry(path: Path, name: str, entry: object, base: int, fix: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{path}: header entry '{name}' is not an object.\n  fix: {fix}", path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CorruptFileError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}.\n  fix: {fix}", path=path)
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CorruptFileError(f"{path}: tensor '{name}' has an invalid shape {shape!r}.\n  fix: {fix}", path=path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CorruptFileError(
            f"{path}: tensor '{name}' has invalid data_offsets {offsets!r}.\n  fix: {fix}", path=path)
    expected = math.ceil(math.prod(shape) * DTYPE_SIZES[dtype])
    if offsets[1] - offsets[0] != expected:
        raise CorruptFileError(
            f"{path}: tensor '{name}' ({dtype}, shape {shape}) needs {expected} bytes but its header "
            f"gives it {offsets[1] - offsets[0]}.\n  fix: {fix}", path=path)
    return TensorInfo(name, dtype, tuple(shape), path, base + offsets[0], base + offsets[1])


@functools.lru_cache(maxsize=32)
def _open(path: str, mtime_ns: int, size: int) -> Any:
    """A cached ``safe_open`` handle: parsing a large header once per file, not once per tensor."""
    from safetensors import safe_open

    return safe_open(path, framework="pt")


@functools.lru_cache(maxsize=32)
def _mapped(path: str, mtime_ns: int, size: int) -> mmap.mmap:
    """A cached private (copy-on-write) mapping of a whole file; tensors are views of it and keep it alive."""
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)


def _view(info: TensorInfo, st: os.stat_result) -> torch.Tensor | None:
    """``info``'s tensor as a view of the file's cached mapping, or None where safetensors must read it (sub-byte
    or unaligned data, a big-endian machine). safetensors' ``get_tensor`` keeps about 64 bytes per call
    (safetensors 0.8.0): 10,000 adapter loads grew RSS by 20 MiB; views of one mapping keep nothing."""
    import torch

    from adapterhub.dtypes import st_to_torch

    try:
        dtype = st_to_torch(info.dtype)
    except FormatError:
        return None  # safetensors says what this torch cannot hold
    nbytes = info.end - info.start
    if sys.byteorder != "little" or nbytes % dtype.itemsize or info.start % dtype.itemsize:
        return None
    if st.st_size < info.end:
        raise OSError(f"the file is {st.st_size} bytes, the tensor ends at byte {info.end}")
    if nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    mm = _mapped(str(info.path), st.st_mtime_ns, st.st_size)
    return torch.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=info.start).view(info.shape)


def load_tensor(info: TensorInfo, *, cached: bool = True) -> torch.Tensor:
    """Read one tensor (memory-mapped) as a torch tensor on the CPU.

    ``cached`` keeps the file's mapping open for the next read: right for adapter files read factor by
    factor, wrong for streaming a large base checkpoint, whose mapped pages would then stay resident.
    """
    from safetensors import SafetensorError, safe_open

    try:
        if not cached:
            with safe_open(str(info.path), framework="pt") as f:
                return f.get_tensor(info.name)
        st = os.stat(info.path)
        view = _view(info, st)
        if view is not None:
            return view
        return _open(str(info.path), st.st_mtime_ns, st.st_size).get_tensor(info.name)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(
            f"Could not read tensor '{info.name}' from {info.path}: {e}\n"
            "  fix: the file changed or is damaged since it was opened; re-download it.",
            path=info.path) from e


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file (contiguous CPU copies; byte-for-byte deterministic).

    Raises:
        OSError: the write failed (disk full, permissions), with its errno (safetensors reports these as
            ``SafetensorError`` carrying only a message).
    """
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    try:
        save_file(data, str(path), metadata=dict(sorted((metadata or {}).items())) or None)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
    if metadata and len(metadata) > 1:
        _sort_metadata(Path(path))


def _sort_metadata(path: Path) -> None:
    """Rewrite the header in place with its metadata keys sorted: safetensors writes them in hash-map order,
    which changes from run to run (same length, so no tensor moves)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n and json.loads(text) == json.loads(raw):
            f.seek(8)
            f.write(text + b" " * (n - len(text)))
