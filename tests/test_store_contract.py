"""One contract, every backend: a local registry directory, a ``file://`` shared directory and an S3
bucket on a real SeaweedFS server. Whatever a registry relies on from its store is pinned here:
create-if-absent (threads and processes racing), compare-and-swap, missing keys, listing, streaming
large blobs (multipart on S3), refusing bytes that do not hash to their name, and the error types."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adapterhub.errors import IntegrityError, NotFoundError, StorageError
from adapterhub.registry.remotes import open_store, parse_location
from adapterhub.registry.store import LocalStore, blob_key

WORKER = Path(__file__).with_name("remote_worker.py")
MiB = 1024 * 1024
BACKENDS = ["local", "file", "s3"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """(kind, url, endpoint, make_store(**s3_options)) for each backend."""
    kind = request.param
    if kind == "local":
        url, endpoint = str(tmp_path / "reg"), None
    elif kind == "file":
        url, endpoint = (tmp_path / "shared" / "reg").as_uri(), None
    else:
        url, endpoint = request.getfixturevalue("s3_url"), request.getfixturevalue("seaweed").endpoint_url

    def make(**options):
        loc = parse_location(url, endpoint)
        store = open_store(loc, **(options if loc.kind == "s3" else {}))
        if isinstance(store, LocalStore):
            store.make_layout()
        return store

    return kind, url, endpoint, make


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_missing_keys_read_as_absent_and_deletes_of_them_are_no_ops(backend):
    _, _, _, make = backend
    store = make()
    d = digest_of(b"never stored")
    assert store.read_doc("refs/_/x/newest") is None and store.read_doc_token("refs/_/x/newest") is None
    assert not store.has_blob(d) and store.blob_size(d) is None and store.get_raw(d) is None
    with pytest.raises(NotFoundError):
        store.open_blob(d)
    with pytest.raises(NotFoundError):
        store.get_bytes(d)
    assert store.swap_doc("refs/_/x/newest", "1\n", "any-token") is False, "CAS on a missing key must fail"
    assert store.read_doc("refs/_/x/newest") is None
    store.delete_doc("refs/_/x/newest")
    store.delete_blob(d)
    assert store.list_docs("refs/_/x") == [] and store.walk_docs("refs") == []


def test_create_if_absent_keeps_the_first_and_cas_refuses_a_stale_token(backend):
    _, _, _, make = backend
    store = make()
    key = "refs/team/sent/versions/1"
    assert store.create_doc(key, "sha256:aa\n") is True
    assert store.create_doc(key, "sha256:bb\n") is False
    assert store.read_doc(key) == "sha256:aa\n"
    text, token = store.read_doc_token(key)
    assert text == "sha256:aa\n"
    assert store.swap_doc(key, "sha256:cc\n", token) is True
    assert store.swap_doc(key, "sha256:dd\n", token) is False, "a stale token must be refused"
    assert store.read_doc(key) == "sha256:cc\n"
    store.delete_doc(key)
    assert store.read_doc(key) is None


def test_create_if_absent_race_between_threads_has_exactly_one_winner(backend):
    _, _, _, make = backend
    store = make()
    for round_ in range(3):
        key = f"refs/_/race/versions/{round_}"
        barrier = threading.Barrier(8)
        won: list[int] = []

        def go(i: int, key: str = key, barrier: threading.Barrier = barrier, won: list[int] = won) -> None:
            barrier.wait()
            if store.create_doc(key, f"writer {i}\n"):
                won.append(i)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"round {round_}: winners {won}"
        assert store.read_doc(key) == f"writer {won[0]}\n"


def test_create_if_absent_race_between_processes_has_exactly_one_winner(backend, tmp_path):
    _, url, endpoint, make = backend
    make()  # the layout exists before the race
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "create", url, endpoint or "-", "refs/_/p/versions/1",
                               f"proc {i}\n", str(go)], stdout=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    go.touch()
    results = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    winners = [i for i, r in enumerate(results) if r == ["WON"]]
    assert len(winners) == 1 and sum(r == ["LOST"] for r in results) == 3, results
    assert make().read_doc("refs/_/p/versions/1") == f"proc {winners[0]}\n"


def test_concurrent_compare_and_swap_loses_no_update(backend):
    _, _, _, make = backend
    store = make()
    key = "refs/_/counter/tags/count"
    assert store.create_doc(key, "0")

    def add(times: int) -> None:
        for _ in range(times):
            while True:
                text, token = store.read_doc_token(key)
                if store.swap_doc(key, str(int(text) + 1), token):
                    break

    threads = [threading.Thread(target=add, args=(10,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_doc(key) == "40"


def test_listing_of_documents_and_blobs(backend):
    _, _, _, make = backend
    store = make()
    for key in ("refs/_/a/versions/1", "refs/_/a/versions/2", "refs/_/a/newest", "refs/team/b/versions/1"):
        assert store.create_doc(key, "x\n")
    assert store.list_docs("refs") == ["_", "team"]
    assert store.list_docs("refs/_/a") == ["newest", "versions"]
    assert store.list_docs("refs/_/a/versions") == ["1", "2"]
    assert store.walk_docs("refs") == ["refs/_/a/newest", "refs/_/a/versions/1", "refs/_/a/versions/2",
                                       "refs/team/b/versions/1"]
    blobs = {store.put_bytes(b"one" * 100): 300, store.put_bytes(b"two" * 7): 21}
    infos = {i.digest: i.size for i in store.list_blob_info()}
    assert infos == blobs and sorted(store.list_blobs()) == sorted(blobs)
    assert all(store.has_blob(d) and store.blob_size(d) == n for d, n in blobs.items())


def test_a_large_blob_streams_in_and_out_in_parts(backend):
    _, _, _, make = backend
    store = make(part_size=5 * MiB, multipart_threshold=5 * MiB)
    data = os.urandom(11 * MiB + 123)
    digest = digest_of(data)
    seen = []
    store.put_blob(digest, len(data), io.BytesIO(data), seen.append)
    assert sum(seen) == len(data)
    assert store.blob_size(digest) == len(data)
    stream = store.open_blob(digest)
    h, n = hashlib.sha256(), 0
    while chunk := stream.read(1 * MiB):
        h.update(chunk)
        n += len(chunk)
    stream.close()
    assert ("sha256:" + h.hexdigest(), n) == (digest, len(data))
    if hasattr(store, "traffic"):
        assert store.traffic.sent == len(data), "three parts, each sent once"


def test_bytes_that_do_not_hash_to_their_name_are_refused_and_nothing_is_stored(backend):
    _, _, _, make = backend
    store = make(part_size=5 * MiB, multipart_threshold=5 * MiB)
    for size in (1000, 6 * MiB):  # a single PUT and a multipart upload
        good = os.urandom(size)
        bad = bytearray(good)
        bad[size // 2] ^= 1
        with pytest.raises(IntegrityError):
            store.put_blob(digest_of(good), size, io.BytesIO(bytes(bad)))
        assert not store.has_blob(digest_of(good))
        assert list(store.list_blob_info()) == []


def test_a_corrupt_stored_blob_is_an_integrity_error(backend, seaweed):
    kind, _, _, make = backend
    store = make()
    digest = store.put_bytes(b"payload" * 1000)
    flipped = _flip_stored(kind, store, seaweed, digest, b"payload" * 1000, at=10, mask=0xFF)
    with pytest.raises(IntegrityError) as e:
        store.get_bytes(digest)
    assert e.value.expected == digest and e.value.actual == digest_of(flipped)
    assert "fix:" in str(e.value)


def test_s3_errors_are_storage_errors_that_say_what_to_do(seaweed, monkeypatch):
    from adapterhub.registry.remotes.s3 import S3Store

    missing = S3Store("no-such-bucket-here", "reg", endpoint_url=seaweed.endpoint_url)
    with pytest.raises(StorageError) as e:
        missing.read_doc("registry.json")
    assert "NoSuchBucket" in str(e.value) and "fix: create the bucket" in str(e.value)
    down = S3Store("bucket", "reg", endpoint_url="http://127.0.0.1:9")  # nothing listens on port 9
    down.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StorageError) as e:
        down.read_doc("registry.json")
    assert "fix: check that the server at http://127.0.0.1:9 runs" in str(e.value)


def _flip_stored(kind: str, store, seaweed, digest: str, data: bytes, *, at: int, mask: int = 0x01) -> bytes:
    """Overwrite the stored blob ``digest`` with ``data`` whose byte ``at`` is XORed with ``mask``; returns that."""
    flipped = bytearray(data)
    flipped[at] ^= mask
    if kind == "s3":
        seaweed.client().put_object(Bucket=store.bucket, Key=store._k(blob_key(digest)), Body=bytes(flipped))
    else:
        path = store.blob_path(digest)
        os.chmod(path, 0o644)
        path.write_bytes(bytes(flipped))
    return bytes(flipped)


def test_a_blob_of_several_chunks_is_received_hashed_and_a_flipped_byte_is_refused(backend, seaweed, tmp_path):
    """What a pull does with each blob: the source streams it, the local destination writes and hashes it in
    8 MiB chunks (a reading thread, reused buffers); a flipped byte anywhere stores nothing."""
    kind, _, _, make = backend
    src = make(part_size=5 * MiB, multipart_threshold=5 * MiB)
    data = os.urandom(11 * MiB + 123)
    digest = digest_of(data)
    src.put_blob(digest, len(data), io.BytesIO(data))
    dst = LocalStore(tmp_path / "dst")
    dst.make_layout()
    seen = []
    stream = src.open_blob(digest)
    assert hasattr(stream, "readinto")
    dst.put_blob(digest, len(data), stream, seen.append)
    stream.close()
    assert dst.blob_path(digest).read_bytes() == data and sum(seen) == len(data)
    if kind == "s3":
        assert stream._fp is not None, "read straight from the HTTP response"
        assert stream._raw._connection is None, "read to its end: the connection went back to the pool"
        assert src.traffic.received == len(data)
    dst.delete_blob(digest)

    _flip_stored(kind, src, seaweed, digest, data, at=len(data) - 3 * MiB)  # in the second chunk of 8 MiB
    stream = src.open_blob(digest)
    with pytest.raises(IntegrityError) as e:
        dst.put_blob(digest, len(data), stream)
    stream.close()
    assert e.value.expected == digest and f"{len(data)} bytes" in str(e.value) and "fix:" in str(e.value)
    assert not dst.has_blob(digest) and list(dst.tmp.iterdir()) == [], "nothing stored, no staging left"


def test_a_stream_without_readinto_is_received_the_same_way(tmp_path):
    class Reads:  # a plain reader (read() only), as a third-party stream may be
        def __init__(self, data: bytes) -> None:
            self.f = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self.f.read(min(n, 3 * MiB + 7) if n and n > 0 else -1)

    from adapterhub.registry.store import receive

    data = os.urandom(9 * MiB + 5)
    with open(tmp_path / "out", "wb") as f:
        assert receive(Reads(data), f.fileno(), chunk=2 * MiB) == (digest_of(data), len(data))
    assert (tmp_path / "out").read_bytes() == data


def test_an_s3_body_that_ends_before_its_length_is_a_network_error_and_stores_nothing(seaweed, s3_url, tmp_path):
    """A connection that closes early is a StorageError saying so (not a damaged blob), and nothing is stored."""
    from adapterhub.registry.remotes.s3 import _CountingStream

    src = open_store(parse_location(s3_url, seaweed.endpoint_url))
    data = os.urandom(3 * MiB)
    digest = digest_of(data)
    src.put_blob(digest, len(data), io.BytesIO(data))
    dst = LocalStore(tmp_path / "dst")
    dst.make_layout()
    body = src.client.get_object(Bucket=src.bucket, Key=src._k(blob_key(digest)))["Body"]
    # the real body of the blob, announced one byte longer than it is: the server's connection ends early
    stream = _CountingStream(body, src.traffic, src._errors, len(data) + 1, src.describe(digest))
    with pytest.raises(StorageError) as e:
        dst.put_blob(digest, len(data) + 1, stream)
    assert f"closed after {len(data)} of {len(data) + 1} bytes" in str(e.value) and "fix:" in str(e.value)
    assert not dst.has_blob(digest) and list(dst.tmp.iterdir()) == []
