"""Benchmark BaseCheckpoint.open() and .fingerprint() on a 7B-shaped (Llama-2-7B) bf16 checkpoint.

The checkpoint (~13.5 GB, sharded into ~5 GB files with config.json and model.safetensors.index.json)
is written without materialising its tensors: each shard's header is written by hand, the file is
extended with ``os.truncate`` (a sparse file), and real random bytes are written only where the
fingerprint samples plus some scattered regions. Reads of the sampled bytes therefore hit real data
on disk once the page cache is dropped.

Usage:
    .venv/bin/python bench/fingerprint.py [--dir DIR] [--keep] [--repeat 5]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from adapterhub.base import INDEX_NAME, BaseCheckpoint, _sample_ranges
from adapterhub.tensorfile import read_header

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 4096, 11008, 32, 32, 32000
LLAMA2_7B_PARAMS = 6_738_415_616
SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"
SCATTER_BYTES = 64 * 1024  # one scattered region of real data ...
SCATTER_EVERY = 64 * 1024**2  # ... every this many bytes of a shard
PAGE = os.sysconf("SC_PAGE_SIZE")


def llama2_7b_tensors() -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of Llama-2-7B, in the order transformers saves them."""
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
            (p + "self_attn.k_proj.weight", [HIDDEN, HIDDEN]),
            (p + "self_attn.v_proj.weight", [HIDDEN, HIDDEN]),
            (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
            (p + "mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN]),
            (p + "mlp.up_proj.weight", [INTERMEDIATE, HIDDEN]),
            (p + "mlp.down_proj.weight", [HIDDEN, INTERMEDIATE]),
            (p + "input_layernorm.weight", [HIDDEN]),
            (p + "post_attention_layernorm.weight", [HIDDEN]),
        ]
    out += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
    return out


def config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def nbytes(shape: list[int]) -> int:
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


def write_checkpoint(root: Path, rng: random.Random) -> dict[str, int]:
    """Write the sparse checkpoint; return counts for the report."""
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in llama2_7b_tensors():  # greedy, like transformers' max_shard_size
        if shards[-1] and size + nbytes(shape) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    weight_map: dict[str, str] = {}
    total = 0
    real_bytes = 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in tensors:
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + nbytes(shape)]}
            off += nbytes(shape)
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)  # safetensors pads the header to 8 bytes
        path = root / fname
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            os.truncate(f.fileno(), 8 + len(hb) + off)  # the data: a hole
        total += off
        # real bytes where the fingerprint samples, and scattered elsewhere
        regions = [r for t in read_header(path).tensors.values() for r in _sample_ranges(t)]
        data_start = 8 + len(hb)
        regions += [(data_start + s, SCATTER_BYTES) for s in range(0, off - SCATTER_BYTES, SCATTER_EVERY)]
        fd = os.open(path, os.O_WRONLY)
        try:
            for start, n in regions:
                os.pwrite(fd, rng.randbytes(n), start)
                real_bytes += n
            os.fsync(fd)  # dirty pages cannot be dropped from the cache
        finally:
            os.close(fd)
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps(config(), indent=2))
    return {"shards": len(shards), "tensors": len(weight_map), "data_bytes": total, "real_bytes": real_bytes}


# --- page cache ---------------------------------------------------------------------------------------


def drop_cache(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_pages(sampled: dict[Path, list[tuple[int, int]]]) -> tuple[int, int]:
    """(resident, total) page-cache pages over the fingerprint's sampled byte ranges (mincore)."""
    resident = total = 0
    for path, ranges in sampled.items():
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap failed")
            try:
                npages = (size + PAGE - 1) // PAGE
                vec = (ctypes.c_ubyte * npages)()
                if _libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                pages = {p for off, n in ranges for p in range(off // PAGE, (off + n - 1) // PAGE + 1)}
                total += len(pages)
                resident += sum(vec[p] & 1 for p in pages)
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident, total


def io_counters() -> dict[str, int]:
    """rchar (bytes through read syscalls) and read_bytes (bytes fetched from storage) of this process."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


# --- measurements --------------------------------------------------------------------------------------


def timed(fn):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(16 * 1024**2)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="parent directory for the checkpoint (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="do not delete the checkpoint at the end")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    args = ap.parse_args()

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fp-bench-7b-", dir=args.dir))
    try:
        t_write, counts = timed(lambda: write_checkpoint(root, random.Random(0)))
        files = sorted(root.glob("model-*.safetensors"))
        on_disk = sum(p.stat().st_blocks * 512 for p in files)
        print(f"checkpoint: {root}  ({len(files)} shards, {human(counts['data_bytes'])} of tensor data, "
              f"{human(on_disk)} actually on disk, written in {t_write:.1f} s)", flush=True)

        base = BaseCheckpoint.open(root)
        assert base.num_parameters == LLAMA2_7B_PARAMS, base.num_parameters
        assert (base.num_layers, base.hidden_size, base.head_dim) == (LAYERS, HIDDEN, HIDDEN // HEADS)
        sampled: dict[Path, list[tuple[int, int]]] = {}
        for t in base.tensors.values():
            sampled.setdefault(t.path, []).extend(_sample_ranges(t))
        sample_bytes = sum(n for ranges in sampled.values() for _, n in ranges)
        open_bytes = sum(header_size(p) for p in files) + sum(
            (root / n).stat().st_size for n in ("config.json", INDEX_NAME))

        # warm: everything the fingerprint reads is in the page cache
        reference = base.fingerprint()
        open_warm = [timed(lambda: BaseCheckpoint.open(root))[0] for _ in range(args.repeat)]
        fp_warm = []
        for _ in range(args.repeat):
            dt, fp = timed(base.fingerprint)
            assert fp == reference
            fp_warm.append(dt)

        # cold: the page cache for the checkpoint's files is dropped before each run
        open_cold, fp_cold, dropped, storage_reads, syscall_reads = [], [], [], [], []
        for _ in range(args.repeat):
            drop_cache(files)
            dropped.append(resident_pages(sampled))
            open_cold.append(timed(lambda: BaseCheckpoint.open(root))[0])
            drop_cache(files)
            before = io_counters()
            dt, fp = timed(base.fingerprint)
            after = io_counters()
            assert fp == reference
            fp_cold.append(dt)
            if before:
                storage_reads.append(after["read_bytes"] - before["read_bytes"])
                syscall_reads.append(after["rchar"] - before["rchar"])
        res_after_fp = resident_pages(sampled)

        # naive alternative: sha256 over every byte of one shard
        drop_cache(files[:1])
        t_sha, _ = timed(lambda: sha256_file(files[0]))
        shard_size = files[0].stat().st_size
        total_size = sum(p.stat().st_size for p in files)
        t_sha_all = t_sha * total_size / shard_size
        buf = os.urandom(256 * 1024**2)
        t_cpu, _ = timed(lambda: hashlib.sha256(buf).digest())
        sha_cpu_rate = len(buf) / t_cpu

        worked = all(r == 0 for r, _ in dropped)
        print()
        print("| measure | value |")
        print("|---|---|")
        print(f"| checkpoint | Llama-2-7B shapes, bf16, {human(total_size)} ({total_size:,} bytes), "
              f"{base.num_parameters:,} params |")
        print(f"| tensors / shards | {counts['tensors']} / {counts['shards']} (~{human(shard_size)} per shard) |")
        print(f"| `BaseCheckpoint.open()` warm (median of {args.repeat}) | {ms(statistics.median(open_warm))} |")
        print(f"| `BaseCheckpoint.open()` cold (median of {args.repeat}) | {ms(statistics.median(open_cold))} |")
        print(f"| `.fingerprint()` warm (median of {args.repeat}) | {ms(statistics.median(fp_warm))} |")
        print(f"| `.fingerprint()` cold (median of {args.repeat}) | {ms(statistics.median(fp_cold))} "
              f"(min {ms(min(fp_cold))}, max {ms(max(fp_cold))}) |")
        print(f"| bytes read by `.fingerprint()` | {human(sample_bytes)} of samples "
              f"({sample_bytes / total_size:.5%} of the checkpoint)"
              + (f"; measured per cold run: {human(statistics.median(syscall_reads))} via read syscalls, "
                 f"{human(statistics.median(storage_reads))} from storage" if storage_reads else "") + " |")
        print(f"| bytes read by `.open()` | {human(open_bytes)} (headers + config + index) |")
        print(f"| page-cache drop (posix_fadvise DONTNEED) | "
              f"{'worked' if worked else 'DID NOT fully work'}: sampled pages resident before each cold run "
              f"{', '.join(f'{r}/{n}' for r, n in dropped)}; after a fingerprint {res_after_fp[0]}/{res_after_fp[1]} |")
        print(f"| sha256 of one full shard, read from the sparse file (holes read back as zeros) | "
              f"{t_sha:.2f} s for {human(shard_size)} ({shard_size / t_sha / 1e9:.2f} GB/s) |")
        print(f"| ... extrapolated to the whole checkpoint | {t_sha_all:.1f} s "
              f"(~{t_sha_all / statistics.median(fp_cold):,.0f}x the cold fingerprint) |")
        print(f"| sha256 CPU cost alone (in-memory, no I/O), extrapolated to the whole checkpoint | "
              f"{total_size / sha_cpu_rate:.1f} s ({sha_cpu_rate / 1e9:.2f} GB/s) |")
        print()
        print(f"fingerprint: {reference}")
        print(f"host: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, files under {root.parent}")
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
