"""The disk's physical floor for moving a set of files: direct-I/O (``O_DIRECT``) reads, writes and an
overlapped copy of the same bytes, with no computation and no page cache.

Modes (each prints one JSON line: seconds, bytes, GiB/s):

  read  SRC...             read every SRC whole, 64 MiB at a time, into one reused buffer
  write SIZE... --out DIR  write files of these byte sizes (random bytes, 64 MiB buffer reused), fsync each
  copy  SRC... --out DIR   a reader thread and a writer thread (4 buffers in flight): the best a streamed
                           read-transform-write can do when the transform is free; fsyncs each file

Standalone on purpose: plain ``os.preadv``/``os.pwrite`` on anonymous-mmap (page-aligned) buffers, no
adapterhub code and no torch, so it is an independent anchor for ``bench/export.py``.

    python bench/diskfloor.py read base/*.safetensors
    python bench/diskfloor.py copy base/*.safetensors --out /tmp/floor-out
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 64 << 20
ALIGN = 4096


def _open(path: Path | str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)


def _write_file(path: Path, size: int, next_chunk: Callable[[], memoryview]) -> None:
    """Write ``size`` bytes taken from ``next_chunk()`` (whole aligned blocks; the last one padded),
    trim the padding and fsync: what a direct writer does."""
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        done = 0
        while done < size:
            view = next_chunk()
            os.pwrite(fd, view, done)
            done += len(view)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(srcs: list[Path]) -> int:
    buf = mmap.mmap(-1, CHUNK)
    total = 0
    for src in srcs:
        fd = _open(src, os.O_RDONLY)
        try:
            view, at = memoryview(buf), 0
            while n := os.preadv(fd, [view], at):
                at += n
        finally:
            os.close(fd)
        total += at
    return total


def write(sizes: list[int], out: Path) -> int:
    buf = mmap.mmap(-1, CHUNK)
    buf.write(os.urandom(CHUNK))
    for i, size in enumerate(sizes):
        left = [size]

        def chunk(left: list[int] = left) -> memoryview:
            n = min(CHUNK, -(-left[0] // ALIGN) * ALIGN)
            left[0] -= n
            return memoryview(buf)[:n]
        _write_file(out / f"floor-{i:05d}.bin", size, chunk)
    return sum(sizes)


def copy(srcs: list[Path], out: Path) -> int:
    """A reader thread fills 4 buffers in turn; this thread writes them and hands each back."""
    free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(4):
        free.put(mmap.mmap(-1, CHUNK))
    full: queue.SimpleQueue[tuple[mmap.mmap, int]] = queue.SimpleQueue()

    def reader() -> None:
        for src in srcs:
            fd = _open(src, os.O_RDONLY)
            try:
                at, size = 0, os.fstat(fd).st_size
                while at < size:
                    b = free.get()
                    n = os.preadv(fd, [memoryview(b)], at)
                    at += n
                    full.put((b, n))
            finally:
                os.close(fd)

    held: list[mmap.mmap] = []

    def chunk() -> memoryview:
        if held:
            free.put(held.pop())
        b, n = full.get()
        held.append(b)
        return memoryview(b)[: -(-n // ALIGN) * ALIGN]

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i, src in enumerate(srcs):
        _write_file(out / f"floor-{i:05d}.bin", src.stat().st_size, chunk)
    t.join()
    return sum(src.stat().st_size for src in srcs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("read", "write", "copy"))
    ap.add_argument("items", nargs="+", help="source files (read, copy) or byte sizes (write)")
    ap.add_argument("--out", type=Path, help="output directory (write, copy)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.mode == "read":
        total = read([Path(p) for p in args.items])
    else:
        if args.out is None:
            sys.exit("--out is needed")
        args.out.mkdir(parents=True, exist_ok=True)
        total = (write([int(s) for s in args.items], args.out) if args.mode == "write"
                 else copy([Path(p) for p in args.items], args.out))
    secs = time.perf_counter() - t0
    print(json.dumps({"mode": args.mode, "seconds": secs, "bytes": total, "GiB/s": total / secs / 2**30}))


if __name__ == "__main__":
    main()
