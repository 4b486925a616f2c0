"""Direct-I/O streaming: byte-exact writes and reads at any size and alignment, buffered fallback, bounded pools."""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest

from adapterhub import streamio
from adapterhub.errors import CorruptFileError
from adapterhub.streamio import (
    ALIGN,
    STAGING_BYTES,
    Aborted,
    BufferPool,
    DirectReader,
    DirectWriter,
    address,
    aligned_buffer,
)


def pieces(seed: int) -> list[memoryview]:
    """Byte pieces of awkward sizes; some sit at the file's block phase (zero-copy), some do not."""
    rng = random.Random(seed)
    sizes = [0, 1, 7, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 17, STAGING_BYTES + 5, 2 * STAGING_BYTES + ALIGN,
             rng.randrange(1, 5 << 20)] + [rng.randrange(1, 300_000) for _ in range(12)]
    rng.shuffle(sizes)
    out, pos = [], 0
    for n in sizes:
        phase = pos % ALIGN if rng.random() < 0.5 else rng.randrange(ALIGN)
        buf = aligned_buffer(phase + n)[phase:]
        buf[:] = rng.randbytes(n)
        out.append(buf if rng.random() < 0.8 else bytes(buf))  # read-only bytes have no usable address: staged
        pos += n
    return out


@pytest.mark.parametrize("direct", [True, False])
def test_writer_writes_exactly_the_bytes(tmp_path, direct):
    parts = pieces(1)
    w = DirectWriter(tmp_path / "f", direct=direct)
    for p in parts:
        w.write(p)
    assert w.size == sum(len(p) for p in parts)
    w.close()
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)


def test_writer_uses_direct_io_where_the_file_system_has_it(tmp_path):
    w = DirectWriter(tmp_path / "f")
    try:
        probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        pytest.skip("this file system has no O_DIRECT")
    os.close(probe)
    assert w.direct
    w.close()


def test_writer_falls_back_to_buffered_when_the_device_refuses_alignment(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if not refused:  # the first direct write is refused, as a device with larger blocks would
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(streamio.os, "pwrite", pwrite)
    parts = pieces(2)
    w = DirectWriter(tmp_path / "f")
    for p in parts:
        w.write(p)
    w.close()
    assert refused and not w.direct
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)


def test_writer_abort_closes_without_finishing(tmp_path):
    w = DirectWriter(tmp_path / "f")
    w.write(b"\x01" * 10)
    w.abort()
    w.abort()
    assert w.fd == -1


@pytest.mark.parametrize("direct", [True, False])
def test_reader_reads_any_range(tmp_path, direct):
    data = os.urandom(3 * STAGING_BYTES + 123)
    (tmp_path / "f").write_bytes(data)
    pool = BufferPool(2)
    rng = random.Random(3)
    ranges = [(0, 0), (0, 1), (1, ALIGN), (ALIGN - 1, 2), (len(data) - 5, 5), (0, len(data))]
    ranges += [(o, rng.randrange(0, len(data) - o)) for o in (rng.randrange(len(data)) for _ in range(20))]
    with DirectReader(direct=direct) as reader:
        for offset, n in ranges:
            lease = reader.read(tmp_path / "f", offset, n, pool)
            assert bytes(lease.data) == data[offset:offset + n], (offset, n)
            lease.release()


@pytest.mark.parametrize("direct", [True, False])
def test_reader_reports_a_truncated_file(tmp_path, direct):
    (tmp_path / "f").write_bytes(b"x" * 5000)
    pool = BufferPool(1)
    with DirectReader(direct=direct) as reader, pytest.raises(CorruptFileError, match="truncated"):
        reader.read(tmp_path / "f", 4000, 2000, pool)
    pool.acquire(1).release()  # the failed read gave its buffer back


def test_reader_falls_back_to_buffered_when_the_device_refuses_alignment(tmp_path, monkeypatch):
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    real = os.preadv
    calls = []

    def preadv(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(streamio.os, "preadv", preadv)
    with DirectReader() as reader:
        lease = reader.read(tmp_path / "f", 5, 90_000, BufferPool(1))
        assert bytes(lease.data) == data[5:90_005]


def test_pool_is_bounded_reuses_buffers_and_honours_phase():
    abort = threading.Event()
    pool = BufferPool(2, abort)
    a = pool.acquire(10_000, phase=100)
    assert address(a.data) % ALIGN == 100 and a.data.nbytes == 10_000
    b = pool.acquire(5)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(8_000)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got, "a third lease must wait for a release"
    a.release()
    t.join(5)
    assert got and address(got[0].data) == address(a.data) - 100, "the released buffer is reused"
    b.release()
    got[0].release()
    pool.acquire(1)
    pool.acquire(1)
    abort.set()
    with pytest.raises(Aborted):
        pool.acquire(1)


def test_aligned_buffer_is_aligned_writable_and_zeroed():
    assert aligned_buffer(0).nbytes == 0
    for n in (1, 4095, 1 << 20, 5 << 20):
        buf = aligned_buffer(n)
        assert address(buf) % ALIGN == 0 and buf.nbytes == n and not buf.readonly
        assert bytes(buf[-3:]) == bytes(min(3, n))
    assert address(memoryview(b"read-only")) is None


def test_a_large_direct_read_is_split_into_reads_in_flight_and_stays_exact(tmp_path, monkeypatch):
    data = os.urandom(3 * streamio.SPLIT_READ + 4321)
    (tmp_path / "f").write_bytes(data)
    real = os.preadv
    calls: list[tuple[int, str]] = []
    refuse = threading.Event()

    def preadv(fd, buffers, offset):
        calls.append((offset, threading.current_thread().name))
        if refuse.is_set() and offset > 0:
            refuse.clear()
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(streamio.os, "preadv", preadv)
    pool = BufferPool(1)
    with DirectReader() as reader:
        lease = reader.read(tmp_path / "f", 7, len(data) - 7, pool)
        assert bytes(lease.data) == data[7:]
        lease.release()
        if not reader._files[tmp_path / "f"][1]:
            pytest.skip("this file system refuses O_DIRECT")
        assert len({offset for offset, _ in calls}) >= streamio.READS_IN_FLIGHT
        assert len({name for _, name in calls}) >= 2, "the parts were read by more than one thread"
        with pytest.raises(CorruptFileError, match="truncated"):
            reader.read(tmp_path / "f", len(data) - streamio.SPLIT_READ, 3 * streamio.SPLIT_READ, pool)
        refuse.set()  # a part refused by the device: the whole range is read again, buffered
        lease = reader.read(tmp_path / "f", 4096, 2 * streamio.SPLIT_READ + 5, pool)
        assert bytes(lease.data) == data[4096:4096 + 2 * streamio.SPLIT_READ + 5]
        lease.release()
    pool.acquire(1).release()
