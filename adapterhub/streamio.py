"""Sequential reads and writes of large files that bypass the page cache (``O_DIRECT``) where the
file system allows it, with a plain buffered fallback.

Streaming a multi-gigabyte checkpoint through the page cache costs a kernel copy of every byte and
a page-cache allocation per 4 KiB, and evicts the user's working set; on small machines that
kernel work, not the disk, is the bottleneck. Direct I/O moves the bytes by DMA between the disk
and our own aligned buffers instead.

Pieces: :func:`aligned_buffer` (a writable memoryview at a page-aligned address), :class:`BufferPool`
(a few reusable buffers shared between threads, so memory stays bounded and pages are faulted in
once), :class:`DirectReader` (byte ranges of files) and :class:`DirectWriter` (an append-only file
that writes whole aligned blocks, straight from the caller's memory when its address allows).

Buffers are plain memoryviews (no torch here): a caller that computes on them wraps them, e.g. with
``torch.frombuffer``, so reading and writing can start before torch is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import Aborted, CorruptFileError

if TYPE_CHECKING:
    import torch

#: alignment of direct I/O addresses, offsets and lengths (a multiple of every common logical block size)
ALIGN = 4096
#: bytes a writer gathers before writing them as whole blocks
STAGING_BYTES = 8 << 20
_HAS_DIRECT = hasattr(os, "O_DIRECT")
#: a direct read of at least twice this many bytes is split into READS_IN_FLIGHT parts read at once
SPLIT_READ = 4 << 20
#: direct reads in flight per read call: one request at a time leaves a virtual disk idle between them
READS_IN_FLIGHT = 2


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable, zero-filled memoryview of ``nbytes`` starting at a page (:data:`ALIGN`) boundary,
    backed by its own anonymous mapping (freed when the last view of it goes)."""
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview(mmap.mmap(-1, nbytes))


def address(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte (None for an empty or read-only one)."""
    if not view.nbytes or view.readonly:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def as_tensor(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...], *, copy_if_misaligned: bool = True
              ) -> torch.Tensor:
    """Bytes seen as a tensor of ``dtype`` and ``shape`` sharing their memory (torch is imported here,
    by the caller's first use). Bytes at an address misaligned for the dtype are copied first, or
    refused with ValueError when ``copy_if_misaligned`` is False (an output must be written in place)."""
    import torch

    t = torch.frombuffer(data, dtype=torch.uint8) if data.nbytes else torch.empty(0, dtype=torch.uint8)
    if t.data_ptr() % dtype.itemsize:
        if not copy_if_misaligned:
            raise ValueError(f"bytes at {t.data_ptr():#x} are misaligned for {dtype}")
        t = t.clone()
    return t.view(dtype).view(shape)


@dataclass
class Lease:
    """One buffer of a :class:`BufferPool`, held until :meth:`release`."""

    pool: BufferPool
    slot: int
    data: memoryview  # the requested bytes (a view into the slot's buffer)
    released: bool = False

    def release(self) -> None:
        """Hand the buffer back (once; later calls do nothing)."""
        if not self.released:
            self.released = True
            self.pool._release(self.slot)


class BufferPool:
    """``count`` reusable byte buffers handed out in turn; :meth:`acquire` waits for a free one.

    Buffers grow to the largest request seen and are kept, so their pages are faulted in once per
    export rather than once per tensor; memory is bounded by ``count`` times the largest request.
    """

    def __init__(self, count: int, abort: threading.Event | None = None) -> None:
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(count):
            self._free.put(slot)
        self._buffers: list[memoryview | None] = [None] * count
        self._abort = abort

    def acquire(self, nbytes: int, phase: int = 0) -> Lease:
        """A lease on ``nbytes`` whose first byte sits at ``phase`` past an :data:`ALIGN` boundary.

        Raises:
            Aborted: the pool's abort event is set (checked before and while waiting).
        """
        while True:
            if self._abort is not None and self._abort.is_set():
                raise Aborted
            try:
                slot = self._free.get(timeout=0.05)
                break
            except queue.Empty:
                pass
        need = phase + nbytes
        buf = self._buffers[slot]
        if buf is None or buf.nbytes < need:
            self._buffers[slot] = None  # free the smaller one before allocating
            buf = self._buffers[slot] = aligned_buffer(need)
        return Lease(self, slot, buf[phase:need])

    def _release(self, slot: int) -> None:
        self._free.put(slot)


def _open(path: Path | str, flags: int, direct: bool, mode: int = 0o666) -> tuple[int, bool]:
    """(fd, is_direct): opened with O_DIRECT when asked and the file system accepts it."""
    if direct and _HAS_DIRECT:
        try:
            return os.open(path, flags | os.O_DIRECT, mode), True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # the file system has no direct I/O
                raise
    return os.open(path, flags, mode), False


def _drop_direct(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


class DirectReader:
    """Reads byte ranges of files into caller buffers (direct I/O where possible; one fd per file)."""

    def __init__(self, *, direct: bool = True) -> None:
        self.direct = direct
        self._files: dict[Path, tuple[int, bool]] = {}
        self._pool: Any = None

    def read(self, path: Path, offset: int, nbytes: int, pool: BufferPool) -> Lease:
        """A lease whose ``data`` holds bytes ``[offset, offset + nbytes)`` of ``path``.

        Raises:
            CorruptFileError: the file ends before ``offset + nbytes``.
        """
        fd, direct = self._fd(path)
        start = offset - offset % ALIGN if direct else offset
        want = offset + nbytes - start
        span = -(-want // ALIGN) * ALIGN if direct else want
        lease = pool.acquire(span)
        try:
            got = self._read_into(path, fd, direct, lease.data, start, want)
            if got < want:
                raise CorruptFileError(f"{path} ends at byte {start + got}, before byte {offset + nbytes} that its "
                                       "header promises.\n  fix: the file is truncated; re-download it.", path=path)
        except BaseException:
            lease.release()
            raise
        lease.data = lease.data[offset - start: offset - start + nbytes]
        return lease

    def _read_into(self, path: Path, fd: int, direct: bool, buf: memoryview, start: int, want: int) -> int:
        if direct and want >= 2 * SPLIT_READ:
            return self._read_split(path, fd, buf, start, want)
        got = 0
        while got < want:
            try:
                n = os.preadv(fd, [buf[got:]], start + got)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                _drop_direct(fd)  # the device refuses this alignment: go on buffered
                self._files[path] = (fd, False)
                return got + self._read_into(path, fd, False, buf[got:], start + got, want - got)
            if n == 0:
                break
            got += n
        return got

    def _read_split(self, path: Path, fd: int, buf: memoryview, start: int, want: int) -> int:
        """A direct read as READS_IN_FLIGHT aligned parts issued at once (the device sees a queue)."""
        from concurrent.futures import ThreadPoolExecutor, wait

        if self._pool is None:
            self._pool = ThreadPoolExecutor(READS_IN_FLIGHT - 1, thread_name_prefix="adapterhub-read")
        span = -(-want // ALIGN) * ALIGN
        part = -(-span // READS_IN_FLIGHT // ALIGN) * ALIGN
        bounds = [(i, min(i + part, span)) for i in range(0, span, part)]

        def one(lo: int, hi: int) -> int:
            got = 0
            while lo + got < hi:
                n = os.preadv(fd, [buf[lo + got: hi]], start + lo + got)
                if n == 0:
                    break
                got += n
            return got

        futures = [self._pool.submit(one, lo, hi) for lo, hi in bounds[1:]]
        try:
            try:
                first = one(*bounds[0])
            finally:
                wait(futures)  # no part may still write into ``buf`` once this returns or raises
            counts = [first] + [f.result() for f in futures]
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            _drop_direct(fd)  # the device refuses this alignment: read it all again, buffered
            self._files[path] = (fd, False)
            return self._read_into(path, fd, False, buf, start, want)
        got = 0
        for (lo, hi), n in zip(bounds, counts, strict=True):
            got += n
            if n < hi - lo:  # the file ends inside this part
                break
        return min(got, want)

    def _fd(self, path: Path) -> tuple[int, bool]:
        if path not in self._files:
            self._files[path] = _open(path, os.O_RDONLY | os.O_CLOEXEC, self.direct)
        return self._files[path]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> DirectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirectWriter:
    """An append-only file written in whole aligned blocks (direct I/O where possible).

    Small or misaligned pieces are gathered in an aligned staging buffer; a piece whose address has
    the same offset from an :data:`ALIGN` boundary as its position in the file is written straight
    from the caller's memory. :meth:`close` writes the tail, trims the padding and fsyncs.
    """

    def __init__(self, path: Path, *, direct: bool = True) -> None:
        self.path = path
        self._staging = aligned_buffer(STAGING_BYTES)
        self._fill = 0  # staged bytes: the file's range [size - fill, size)
        self.size = 0  # bytes accepted so far
        self.fd, self.direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, direct)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append the bytes of a contiguous buffer."""
        left = memoryview(data).cast("B")
        while left.nbytes:
            if not self.direct:
                self._flush()
                self._pwrite(left, self.size)
                self.size += left.nbytes
                return
            at = address(left)
            if self._fill % ALIGN == 0 and at is not None and at % ALIGN == 0 and left.nbytes >= ALIGN:
                self._flush()
                n = left.nbytes - left.nbytes % ALIGN
                self._pwrite(left[:n], self.size)
                self.size += n
                left = left[n:]
                continue
            room = STAGING_BYTES - self._fill
            to_block = -self._fill % ALIGN or ALIGN
            if at is not None and (at + to_block) % ALIGN == 0 and left.nbytes > to_block:
                room = min(room, to_block)  # stop at the block boundary: the rest can go straight out
            n = min(room, left.nbytes)
            self._staging[self._fill: self._fill + n] = left[:n]
            self._fill += n
            self.size += n
            left = left[n:]
            if self._fill == STAGING_BYTES:
                self._flush()

    def close(self) -> None:
        """Write what is staged, trim the block padding, fsync and close."""
        try:
            if self._fill:
                pad = -self._fill % ALIGN if self.direct else 0
                if pad:
                    self._staging[self._fill: self._fill + pad] = bytes(pad)
                self._pwrite(self._staging[: self._fill + pad], self.size - self._fill)
                self._fill = 0
                if pad:
                    os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without finishing (the caller removes the file)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def _flush(self) -> None:
        if self._fill:
            self._pwrite(self._staging[: self._fill], self.size - self._fill)
            self._fill = 0

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < view.nbytes:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                _drop_direct(self.fd)  # the device refuses this alignment: go on buffered
                self.direct = False
