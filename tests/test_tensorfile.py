"""adapterhub.tensorfile: safetensors headers parsed and checked against the real file.

Files are written with ``safetensors.torch.save_file`` (the reference writer) or crafted byte by byte
(8-byte little-endian header length + JSON + data) so that damaged and lying headers are exact. For
every damaged file, the reference reader (``safetensors.safe_open``) is also asked: it must reject the
file too, so these tests cannot pass by declaring good files bad.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import raw_file
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from adapterhub.errors import CorruptFileError, FormatError, MissingFileError
from adapterhub.tensorfile import MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo, load_tensor, read_header

# --- helpers ----------------------------------------------------------------------------------------


def entry(dtype: object, shape: object, start: object, end: object) -> dict[str, object]:
    """One header entry, exactly as given (no checking: the point is to be able to lie)."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def reference_rejects(path: Path) -> bool:
    """Whether safetensors itself refuses to open the file or read every tensor of it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except (SafetensorError, OSError):
        return True
    return False


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN == NaN with the same payload, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.contiguous().view(torch.uint8).flatten().tolist() == b.contiguous().view(torch.uint8).flatten().tolist()


def awkward(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values plus the bit patterns that a lossy round trip would change: NaN, +-inf, -0.0."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype).flatten()
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-8], dtype=dtype)
    t[: len(specials)] = specials
    return t.reshape(shape)


GOOD_TENSORS = {
    "w32": awkward(torch.float32, (3, 5), 0),
    "wbf16": awkward(torch.bfloat16, (7, 4), 1),
    "wf16": awkward(torch.float16, (2, 3, 4), 2),
    "empty": torch.zeros((0,), dtype=torch.float32),
    "empty2d": torch.zeros((3, 0), dtype=torch.bfloat16),
    "idx": torch.arange(6, dtype=torch.int64).reshape(2, 3),
}
GOOD_METADATA = {"format": "pt", "origin": "unit test", "unicode": "größe ✓"}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file(GOOD_TENSORS, str(path), metadata=GOOD_METADATA)
    return path


# --- happy path ---------------------------------------------------------------------------------------


def test_header_matches_what_was_saved(good: Path) -> None:
    h = read_header(good)
    assert isinstance(h, SafetensorsHeader)
    assert h.path == good
    assert h.file_size == good.stat().st_size
    assert set(h.tensors) == set(GOOD_TENSORS)
    expected_dtypes = {"w32": "F32", "wbf16": "BF16", "wf16": "F16", "empty": "F32", "empty2d": "BF16", "idx": "I64"}
    raw = good.read_bytes()
    n = header_len(good)
    on_disk = json.loads(raw[8 : 8 + n])  # independent parse of the same header
    for name, t in GOOD_TENSORS.items():
        info = h.tensors[name]
        assert isinstance(info, TensorInfo)
        assert info.name == name and info.path == good
        assert info.dtype == expected_dtypes[name]
        assert info.shape == tuple(t.shape)
        assert info.numel == t.numel()
        assert info.nbytes == t.numel() * t.element_size()
        start, end = on_disk[name]["data_offsets"]
        assert (info.start, info.end) == (8 + n + start, 8 + n + end)
        # the byte range really holds the tensor's bytes
        assert raw[info.start : info.end] == t.contiguous().view(torch.uint8).numpy().tobytes()
    assert h.metadata == GOOD_METADATA


@pytest.mark.parametrize("name", ["w32", "wbf16", "wf16", "idx"])
def test_load_tensor_is_bit_identical(good: Path, name: str) -> None:
    loaded = load_tensor(read_header(good).tensors[name])
    assert same_bits(loaded, GOOD_TENSORS[name])


def test_zero_size_tensors(good: Path) -> None:
    h = read_header(good)
    for name in ("empty", "empty2d"):
        info = h.tensors[name]
        assert info.nbytes == 0 and info.numel == 0 and info.start == info.end
        loaded = load_tensor(info)
        assert loaded.shape == GOOD_TENSORS[name].shape and loaded.dtype == GOOD_TENSORS[name].dtype


def test_only_zero_size_tensors_and_no_metadata(tmp_path: Path) -> None:
    path = tmp_path / "z.safetensors"
    save_file({"a": torch.zeros((0, 4)), "b": torch.zeros((2, 0, 3), dtype=torch.float16)}, str(path))
    h = read_header(path)
    assert {k: v.shape for k, v in h.tensors.items()} == {"a": (0, 4), "b": (2, 0, 3)}
    assert h.metadata == {}
    assert h.file_size == 8 + header_len(path)


def test_empty_file_of_tensors(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "none.safetensors", {})
    h = read_header(path)
    assert h.tensors == {} and h.metadata == {}


def test_crafted_file_is_valid(tmp_path: Path) -> None:
    """The crafting helper writes files the reference reader accepts, so the lies below are the only fault."""
    data = struct.pack("<3f", 1.0, -2.5, 3.25) + struct.pack("<2e", 0.5, -1.0)
    header = {"b": entry("F16", [2], 12, 16), "a": entry("F32", [3], 0, 12), "__metadata__": {"k": "v"}}
    path = raw_file(tmp_path / "crafted.safetensors", header, data)
    assert not reference_rejects(path)
    h = read_header(path)
    assert h.metadata == {"k": "v"}
    base = 8 + header_len(path)
    assert (h.tensors["a"].start, h.tensors["a"].end) == (base, base + 12)
    assert (h.tensors["b"].start, h.tensors["b"].end) == (base + 12, base + 16)
    assert load_tensor(h.tensors["a"]).tolist() == [1.0, -2.5, 3.25]
    assert load_tensor(h.tensors["b"]).tolist() == [0.5, -1.0]


WRITABLE_DTYPES = [
    (torch.float64, "F64"), (torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16"),
    (torch.int64, "I64"), (torch.int32, "I32"), (torch.int16, "I16"), (torch.int8, "I8"), (torch.uint8, "U8"),
    (torch.uint16, "U16"), (torch.uint32, "U32"), (torch.uint64, "U64"), (torch.bool, "BOOL"),
    (torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fnuz, "F8_E4M3FNUZ"), (torch.float8_e5m2fnuz, "F8_E5M2FNUZ"), (torch.complex64, "C64"),
]


@pytest.mark.parametrize(("dtype", "st_name"), WRITABLE_DTYPES, ids=[n for _, n in WRITABLE_DTYPES])
def test_every_dtype_the_reference_writer_writes_is_accepted(tmp_path: Path, dtype: torch.dtype, st_name: str) -> None:
    t = torch.arange(15, dtype=torch.float32).reshape(3, 5).to(dtype)
    path = tmp_path / "d.safetensors"
    save_file({"x": t}, str(path))
    info = read_header(path).tensors["x"]
    assert (info.dtype, info.shape, info.nbytes) == (st_name, (3, 5), 15 * t.element_size())
    assert same_bits(load_tensor(info), t)


# --- damaged files ------------------------------------------------------------------------------------


def truncate_at(good: Path, where: str) -> int:
    """A byte count inside the named region of the saved file."""
    n, size = header_len(good), good.stat().st_size
    return {
        "empty": 0, "prefix_1": 1, "prefix_7": 7, "prefix_only": 8,
        "header_start": 9, "header_middle": 8 + n // 2, "header_last_byte_missing": 8 + n - 1,
        "header_no_data": 8 + n, "data_first_byte": 8 + n + 1,
        "data_middle": 8 + n + (size - 8 - n) // 2, "data_last_byte_missing": size - 1,
    }[where]


TRUNCATIONS = {
    "empty": "shorter than the 8-byte",
    "prefix_1": "shorter than the 8-byte",
    "prefix_7": "shorter than the 8-byte",
    "prefix_only": "header claims",
    "header_start": "header claims",
    "header_middle": "header claims",
    "header_last_byte_missing": "header claims",
    "header_no_data": "is truncated",
    "data_first_byte": "is truncated",
    "data_middle": "is truncated",
    "data_last_byte_missing": "is truncated",
}


@pytest.mark.parametrize(("where", "fragment"), TRUNCATIONS.items(), ids=list(TRUNCATIONS))
def test_truncated(good: Path, where: str, fragment: str) -> None:
    full_size = good.stat().st_size
    cut = truncate_at(good, where)
    assert 0 <= cut < full_size
    os.truncate(good, cut)
    assert reference_rejects(good)
    with pytest.raises(CorruptFileError) as ei:
        read_header(good)
    msg = str(ei.value)
    assert str(good) in msg and fragment in msg
    assert f"{cut} bytes" in msg or f"has {cut}" in msg  # the real size is reported
    if where.startswith("data"):
        assert f"describes {full_size} bytes" in msg
    assert ei.value.path == good


def test_trailing_garbage(good: Path) -> None:
    size = good.stat().st_size
    with open(good, "ab") as f:
        f.write(b"\x00garbage")
    assert reference_rejects(good)
    with pytest.raises(CorruptFileError, match="longer than its header says") as ei:
        read_header(good)
    assert str(good) in str(ei.value) and f"describes {size} bytes, the file has {size + 8}" in str(ei.value)


# (header, data, header_bytes or None, message fragments); "{p}" stands for the file's path
LIES: dict[str, tuple[object, bytes, bytes | None, list[str]]] = {
    "json_syntax": (None, b"", b'{"a": {"dtype": "F32", ', ["not valid JSON"]),
    "json_not_utf8": (None, b"", b'{"\xff\xfe": 1}', ["not valid JSON"]),
    "json_empty_header": (None, b"", b"", ["not valid JSON"]),
    "json_list": ([1, 2], b"", None, ["not a JSON object"]),
    "metadata_not_strings": ({"__metadata__": {"k": 1}, "a": entry("F32", [1], 0, 4)}, b"\0" * 4, None,
                             ["__metadata__ must map strings to strings"]),
    "metadata_list": ({"__metadata__": [], "a": entry("F32", [1], 0, 4)}, b"\0" * 4, None,
                      ["__metadata__ must map strings to strings"]),
    "entry_not_object": ({"a": [0, 4]}, b"\0" * 4, None, ["header entry 'a' is not an object"]),
    "offsets_larger": ({"a": entry("F32", [2, 3], 0, 28)}, b"\0" * 28, None,
                       ["tensor 'a'", "needs 24 bytes", "gives it 28"]),
    "offsets_smaller": ({"a": entry("BF16", [4, 4], 0, 30)}, b"\0" * 30, None,
                        ["tensor 'a'", "BF16", "needs 32 bytes", "gives it 30"]),
    "offsets_smaller_second": ({"a": entry("F32", [1], 0, 4), "b": entry("F16", [3], 4, 8)}, b"\0" * 8, None,
                               ["tensor 'b'", "needs 6 bytes", "gives it 4"]),
    "offsets_reversed": ({"a": entry("F32", [0], 4, 0)}, b"\0" * 4, None, ["tensor 'a'", "invalid data_offsets"]),
    "offsets_negative": ({"a": entry("F32", [1], -4, 0)}, b"", None, ["tensor 'a'", "invalid data_offsets"]),
    "offsets_not_ints": ({"a": entry("F32", [1], 0.0, 4.0)}, b"\0" * 4, None, ["tensor 'a'", "invalid data_offsets"]),
    "offsets_missing": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, ["tensor 'a'", "invalid data_offsets"]),
    "overlap": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12, None,
                ["tensor 'b' overlaps another tensor", "starts at byte 4, expected 8"]),
    "same_range_twice": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, b"\0" * 8, None,
                         ["overlaps another tensor"]),
    "gap": ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, b"\0" * 12, None,
            ["tensor 'b' leaves a gap before it", "starts at byte 8, expected 4"]),
    "gap_at_start": ({"a": entry("F32", [1], 4, 8)}, b"\0" * 8, None,
                     ["tensor 'a' leaves a gap before it", "starts at byte 4, expected 0"]),
    "past_eof": ({"a": entry("F32", [4], 0, 16)}, b"\0" * 8, None, ["is truncated", "describes"]),
    "second_past_eof": ({"a": entry("F32", [1], 0, 4), "b": entry("F64", [1000], 4, 8004)}, b"\0" * 100, None,
                        ["is truncated"]),
    "unknown_dtype": ({"a": entry("F7", [1], 0, 4)}, b"\0" * 4, None, ["tensor 'a'", "unknown dtype 'F7'"]),
    "lowercase_dtype": ({"a": entry("f32", [1], 0, 4)}, b"\0" * 4, None, ["tensor 'a'", "unknown dtype 'f32'"]),
    "dtype_not_string": ({"a": entry(["F32"], [1], 0, 4)}, b"\0" * 4, None, ["tensor 'a'", "unknown dtype"]),
    "dtype_missing": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, ["tensor 'a'", "unknown dtype"]),
    "shape_negative": ({"a": entry("F32", [-1], 0, 4)}, b"\0" * 4, None, ["tensor 'a'", "invalid shape"]),
    "shape_not_list": ({"a": entry("F32", "4", 0, 16)}, b"\0" * 16, None, ["tensor 'a'", "invalid shape"]),
    "shape_float": ({"a": entry("F32", [2.0], 0, 8)}, b"\0" * 8, None, ["tensor 'a'", "invalid shape"]),
}


@pytest.mark.parametrize("case", list(LIES), ids=list(LIES))
def test_lying_or_malformed_header(tmp_path: Path, case: str) -> None:
    header, data, header_bytes, fragments = LIES[case]
    path = raw_file(tmp_path / f"{case}.safetensors", header, data, header_bytes=header_bytes)
    assert reference_rejects(path)
    with pytest.raises(CorruptFileError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg
    assert ei.value.path == path
    assert isinstance(ei.value, FormatError)


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "long.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4, declared_len=10_000)
    with pytest.raises(CorruptFileError, match="header claims 10000 bytes") as ei:
        read_header(path)
    assert str(path) in str(ei.value) and f"has {path.stat().st_size} bytes" in str(ei.value)


def test_header_length_absurd(tmp_path: Path) -> None:
    """A length prefix far past the limit is refused without trying to read that much."""
    path = raw_file(tmp_path / "absurd.safetensors", {}, declared_len=2**63)
    with pytest.raises(CorruptFileError, match=f"header claims {2**63} bytes"):
        read_header(path)
    path2 = tmp_path / "big.safetensors"
    # a file really that long, but with a header above the limit: still refused
    raw_file(path2, {}, declared_len=MAX_HEADER_BYTES + 1)
    os.truncate(path2, 8 + MAX_HEADER_BYTES + 1)  # sparse
    with pytest.raises(CorruptFileError) as ei:
        read_header(path2)
    assert str(ei.value).startswith(f"{path2} has a header of 100,000,001 bytes, more than the 100,000,000 "
                                    "safetensors allows (about a million tensors).\n  fix: ")


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")  # an LFS pointer
    assert reference_rejects(path)
    with pytest.raises(CorruptFileError) as ei:
        read_header(path)
    assert str(path) in str(ei.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.mkdir()
    with pytest.raises(CorruptFileError, match="is a directory") as ei:
        read_header(path)
    assert str(path) in str(ei.value) and ei.value.path == path


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(MissingFileError, match="does not exist") as ei:
        read_header(path)
    assert str(path) in str(ei.value) and ei.value.path == path
    assert isinstance(ei.value, FormatError) and isinstance(ei.value, FileNotFoundError)


def test_accepts_str_path(good: Path) -> None:
    assert read_header(str(good)).tensors.keys() == read_header(good).tensors.keys()


def test_load_tensor_after_file_was_damaged(good: Path) -> None:
    """A file truncated after its header was read: the error names the tensor and the file."""
    info = read_header(good).tensors["wf16"]
    os.truncate(good, header_len(good) + 8 + 4)
    with pytest.raises(CorruptFileError) as ei:
        load_tensor(info)
    assert "'wf16'" in str(ei.value) and str(good) in str(ei.value)


def test_f4_packed_sizes(tmp_path: Path) -> None:
    """Sub-byte dtypes: F4 is half a byte per element, rounded up to whole bytes."""
    path = raw_file(tmp_path / "f4.safetensors", {"a": entry("F4", [4, 4], 0, 8)}, b"\x11" * 8)
    info = read_header(path).tensors["a"]
    assert (info.nbytes, info.numel) == (8, 16)
    bad = raw_file(tmp_path / "f4bad.safetensors", {"a": entry("F4", [4, 4], 0, 16)}, b"\x11" * 16)
    with pytest.raises(CorruptFileError, match="needs 8 bytes but its header gives it 16"):
        read_header(bad)
    # an odd element count rounds up
    odd = raw_file(tmp_path / "f4odd.safetensors", {"a": entry("F4", [3], 0, 2)}, b"\x11" * 2)
    assert read_header(odd).tensors["a"].nbytes == 2


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_reading_adapters_again_and_again_keeps_no_memory(tmp_path: Path) -> None:
    """An adapter pool reads every factor of every adapter it loads, cycling through more files than any cache
    holds. safetensors (0.8.0) kept about 2 KiB per file opened: 10,000 loads grew RSS by 20 MiB. Cached reads
    are views of one mapping per file now and keep nothing."""
    infos = []
    for k in range(64):
        tensors = {f"m{j}.lora_A": torch.randn(4, 8) for j in range(16)}
        tensors.update({f"m{j}.lora_B": torch.randn(8, 4).to(torch.bfloat16) for j in range(16)})
        save_file(tensors, tmp_path / f"{k}.safetensors")
        infos += read_header(tmp_path / f"{k}.safetensors").tensors.values()
    want = {(str(i.path), i.name): load_tensor(i).clone() for i in infos}
    for info in infos * 5:
        load_tensor(info)
    start = _rss()
    for info in infos * 40:  # 2,560 files opened (82,000 reads) where a 32-entry cache of handles was used
        load_tensor(info)
    grown = _rss() - start
    assert grown < 2 * 2**20, f"RSS grew by {grown / 2**20:.2f} MiB"
    assert all(torch.equal(load_tensor(i), want[(str(i.path), i.name)]) for i in infos)
