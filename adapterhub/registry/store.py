"""Content-addressed storage: immutable blobs named by sha256, and small mutable documents (refs).

The interface is deliberately small (put, get, exists, list, conditional create, atomic replace)
so that other backends can serve a registry. :class:`LocalStore` keeps git's layout:
``blobs/sha256/ab/cdef...`` written to a temp file in the same file system, fsynced, renamed, and
made read-only (0444).

Staging files carry their writer's token (``tmp/<token>.blob-...``); the writer holds an exclusive
``flock`` on ``locks/staging/<token>.lock`` for as long as it lives, so a staging file whose token's
lock can be taken was left by a process that is gone (killed, crashed) and is removed at once
(:meth:`LocalStore.remove_dead_staging`); the kernel drops the lock when the process dies, whatever
killed it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from adapterhub.errors import IntegrityError, NotFoundError, StorageError, storage_error

CHUNK = 8 * 1024 * 1024
Progress = Callable[[int], None]
#: ``<token>.`` at the start of a staging entry's name: ``w<pid>-<12 hex>``
_TOKEN = re.compile(r"(w\d+-[0-9a-f]{12})\.")
# one writer token per registry per process: {locks dir: (token, fd holding its flock)}
_OWNERS: dict[str, tuple[str, int]] = {}
_OWNERS_LOCK = threading.Lock()

PutStatus = Literal["stored", "deduplicated", "verified", "repaired"]


@dataclass(frozen=True)
class Put:
    """What storing one file did.

    ``status``: ``stored`` (a new blob), ``deduplicated`` (an existing blob trusted: its stat stamp is
    unchanged since it was last hashed), ``verified`` (an existing blob re-hashed and found intact),
    ``repaired`` (an existing blob was damaged and has been replaced by the good bytes).
    """

    digest: str
    size: int
    status: PutStatus

    @property
    def hashed(self) -> bool:
        """True when the blob's bytes are known to match its digest now (worth a stat stamp)."""
        return self.status != "deduplicated"


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Translate OSErrors into :class:`StorageError` with a hint (disk full, permissions)."""
    try:
        yield
    except (StorageError, IntegrityError, NotFoundError):
        raise
    except OSError as e:
        raise storage_error(e, what) from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """(``sha256:HEX``, size) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return f"sha256:{h.hexdigest()}", size


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob as listed: its digest, size and last modification time (seconds since the epoch)."""

    digest: str
    size: int
    mtime: float


class Store(Protocol):
    """What a registry needs from storage: the seam every backend implements.

    Blobs are immutable and named by the sha256 of their bytes; documents ("docs": refs and the
    format marker) are small texts under slash-separated keys (``refs/_/sent/versions/1``) with
    create-if-absent and compare-and-swap. Every backend keeps the same layout (``registry/FORMAT.md``).

    ``local`` is True for a directory on this machine: only such a store offers the local-only
    concerns (``lock``, ``stat_stamp``, ``blob_path`` for links and snapshots, staging of writer
    processes). A remote store's ``lock`` coordinates nothing: its writers rely on conditional
    writes alone.
    """

    local: bool
    location: str
    writable: bool

    # blobs
    def has_blob(self, digest: str) -> bool: ...
    def blob_size(self, digest: str) -> int | None: ...
    def put_file(self, src: Path, progress: Progress | None = None, *,
                 trusted: Callable[[str], bool] | None = None) -> Put: ...
    def put_blob(self, digest: str, size: int, reader: BinaryIO, progress: Progress | None = None, *,
                 verified: bool = False) -> None: ...
    def put_bytes(self, data: bytes) -> str: ...
    def get_raw(self, digest: str) -> bytes | None: ...
    def get_bytes(self, digest: str) -> bytes: ...
    def open_blob(self, digest: str) -> BinaryIO: ...
    def list_blobs(self) -> Iterator[str]: ...
    def list_blob_info(self) -> Iterator[BlobInfo]: ...
    def delete_blob(self, digest: str) -> None: ...
    def describe(self, digest: str) -> str: ...
    # docs
    def read_doc(self, key: str) -> str | None: ...
    def read_doc_token(self, key: str) -> tuple[str, str] | None: ...
    def create_doc(self, key: str, text: str) -> bool: ...
    def swap_doc(self, key: str, text: str, token: str) -> bool: ...
    def replace_doc(self, key: str, text: str) -> None: ...
    def delete_doc(self, key: str) -> None: ...
    def list_docs(self, prefix: str) -> list[str]: ...
    def walk_docs(self, prefix: str) -> list[str]: ...
    # coordination and leftovers
    def lock(self, rel: str, exclusive: bool = True) -> AbstractContextManager[None]: ...
    def foreign_entries(self) -> list[str]: ...
    def leftovers(self, grace: float) -> list[Leftover]: ...
    def remove_leftover(self, item: Leftover, grace: float) -> int: ...


@dataclass(frozen=True)
class Leftover:
    """Something an interrupted writer left behind that gc may remove: a staging entry of a local
    registry (``what="staging"``) or a pending multipart upload of a remote one (``what="upload"``)."""

    what: str
    where: str
    size: int
    handle: object = None
    why: str = ""


def prefetched(reader: BinaryIO, chunk: int = CHUNK, depth: int = 2) -> Iterator[bytes]:
    """The chunks of a stream, read ahead by a second thread (a socket read overlaps the caller's hashing
    and writing; both release the GIL). The reader thread stops when the caller does."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                data = reader.read(chunk)
                while not stop.is_set():
                    try:
                        q.put(data, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if not data:
                    return
        except BaseException as e:  # handed to the caller, raised there
            q.put(e)

    t = threading.Thread(target=run, daemon=True, name="adapterhub-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


#: start each received chunk's write-back as soon as it is written (the final fsync then waits for little)
WRITE_BEHIND = True


def _fill(readinto: Callable[[memoryview], int | None], buf: bytearray) -> int:
    """Read into ``buf`` until it is full or the stream ends; the bytes read."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = readinto(view[got:])
        if not n:
            break
        got += n
    return got


def receive(reader: BinaryIO, fd: int, progress: Progress | None = None, *, chunk: int = CHUNK,
            depth: int = 3) -> tuple[str, int]:
    """Copy a stream to the file ``fd`` and return (``sha256:HEX``, bytes) of what arrived.

    A second thread reads (with ``readinto`` into ``depth`` reused buffers when the stream has it, so
    no chunk is allocated or copied twice), writes each chunk and starts its write-back; this thread
    hashes the chunks in order meanwhile (reading, writing and hashing all release the GIL). The caller
    decides what the digest allows; nothing here is fsynced."""
    readinto = getattr(reader, "readinto", None)
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(depth if readinto is not None else 0):
        free.put(bytearray(chunk))
    stop = threading.Event()

    def run() -> None:
        offset = 0
        try:
            while not stop.is_set():
                if readinto is not None:
                    try:
                        buf = free.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    n = _fill(readinto, buf)
                    data: bytes | memoryview = memoryview(buf)[:n]
                else:
                    buf, data = None, reader.read(chunk)
                    n = len(data)
                if stop.is_set():
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if n and WRITE_BEHIND:
                    with suppress(OSError):  # a hint: some file systems refuse it
                        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
                offset += n
                full.put((buf, data, n))
                if not n:
                    return
        except BaseException as e:  # handed to the hashing thread, raised there
            full.put(e)

    t = threading.Thread(target=run, daemon=True, name="adapterhub-receive")
    t.start()
    h = hashlib.sha256()
    size = 0
    try:
        while True:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buf, data, n = item
            if not n:
                break
            h.update(data)
            size += n
            if buf is not None:
                free.put(buf)
            if progress:
                progress(n)
    finally:
        stop.set()
        t.join()  # never leave a thread that could still write to fd once the caller closes it
    return f"sha256:{h.hexdigest()}", size


def blob_key(digest: str) -> str:
    """The layout key of a blob: ``blobs/sha256/ab/cdef...``."""
    hexd = digest.removeprefix("sha256:")
    return f"blobs/sha256/{hexd[:2]}/{hexd[2:]}"


def verify_bytes(data: bytes, digest: str, where: str) -> None:
    """Raise :class:`IntegrityError` unless ``data`` hashes to ``digest``."""
    actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
    if actual != digest:
        raise corrupt(digest, actual, where)


class HashingReader:
    """Wraps a stream and hashes every byte read through it (``digest`` once exhausted)."""

    def __init__(self, raw: BinaryIO, progress: Progress | None = None) -> None:
        self.raw = raw
        self.h = hashlib.sha256()
        self.size = 0
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.h.update(chunk)
        self.size += len(chunk)
        if self.progress and chunk:
            self.progress(len(chunk))
        return chunk

    @property
    def digest(self) -> str:
        return f"sha256:{self.h.hexdigest()}"


#: what a registry directory may hold besides its layout (an index being rebuilt: index.sqlite-wal, ...)
LAYOUT = ("blobs", "refs", "locks", "tmp", "snapshots", "index.sqlite", "registry.json", "remotes.json")


class LocalStore:
    """A :class:`Store` in a local directory (also what a ``file://`` remote on a shared file system is).

    Local-only concerns live here: POSIX ``flock`` locks (:meth:`lock`), staging owned by live
    writers, stat stamps of blob files (:meth:`stat_stamp`) and blob paths for links and snapshots.
    """

    local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.staging_locks = self.root / "locks" / "staging"
        self.writable = True

    # --- layout, writability, locks ------------------------------------------------------------

    def make_layout(self) -> None:
        for sub in ("blobs/sha256", "refs", "locks", "tmp", "snapshots"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def foreign_entries(self) -> list[str]:
        """Entries of the directory that are not part of a registry's layout."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.name not in LAYOUT
                      and not p.name.startswith("index.sqlite"))

    def check_writable(self) -> bool:
        """Whether this process may change the registry: its directory and ``locks/`` accept new entries
        (False on a read-only mount, an immutable directory, or without write permission)."""
        locks = self.root / "locks"
        self.writable = os.access(self.root, os.W_OK | os.X_OK) and (
            not locks.exists() or os.access(locks, os.W_OK | os.X_OK))
        return self.writable

    @contextmanager
    def lock(self, rel: str, exclusive: bool = True) -> Iterator[None]:
        """Hold ``locks/<rel>`` (flock) shared or exclusively; nothing on a read-only registry, which
        nobody can change."""
        if not self.writable:
            yield
            return
        path = self.root / "locks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def stat_stamp(self, digest: str) -> str | None:
        """The blob file's inode, size, mtime and ctime (any write, chmod or replacement changes it)."""
        try:
            st = self.blob_path(digest).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def describe(self, digest: str) -> str:
        """Where a blob lives, for messages."""
        return str(self.blob_path(digest))

    # --- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.blobs / hexd[:2] / hexd[2:]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_size(self, digest: str) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    # --- staging, owned by a live writer ----------------------------------------------------

    def writer_token(self) -> str:
        """This process's staging token for this store, created (and its lock taken) on first use.

        The lock file is created under a temporary name, locked, then renamed into place, so a
        ``<token>.lock`` file is never seen unlocked while its writer lives.
        """
        key = str(self.staging_locks)
        with _OWNERS_LOCK:
            if key in _OWNERS:
                return _OWNERS[key][0]
            self.staging_locks.mkdir(parents=True, exist_ok=True)
            token = f"w{os.getpid()}-{secrets.token_hex(6)}"
            pending = self.staging_locks / f".{token}.new"
            fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, f"pid {os.getpid()}\nstarted {time.time():.3f}\n".encode())
                os.rename(pending, self.staging_locks / f"{token}.lock")
            except BaseException:
                os.close(fd)
                pending.unlink(missing_ok=True)
                raise
            _OWNERS[key] = (token, fd)
            return token

    def _temp(self) -> tuple[int, Path]:
        token = self.writer_token()
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=f"{token}.blob-")
        return fd, Path(name)

    def staging_dir(self, prefix: str) -> Path:
        """A new directory in ``tmp/`` owned by this process (``prefix`` names its purpose)."""
        token = self.writer_token()
        self.tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{token}.{prefix}", dir=self.tmp))

    def staging_owner(self, entry: Path) -> tuple[str | None, bool | None]:
        """(token, alive) of a ``tmp/`` entry: alive is True (its writer runs), False (its writer is
        gone) or None (no token or no lock file: an older adapterhub, or a lock removed by hand)."""
        m = _TOKEN.match(entry.name)
        if m is None:
            return None, None
        token = m.group(1)
        if token == _OWNERS.get(str(self.staging_locks), (None,))[0]:
            return token, True
        return token, self._alive(self.staging_locks / f"{token}.lock")

    @staticmethod
    def _alive(lock: Path) -> bool | None:
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:  # unreadable: assume a writer, remove nothing
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock
        return False

    def remove_dead_staging(self) -> list[tuple[Path, int]]:
        """Remove the staging entries of writers that are gone, and their lock files.

        Returns (path, bytes) of every entry removed. Safe to run from many processes at once and
        beside running writers: an entry is removed only while its writer's lock is held by us.
        """
        removed: list[tuple[Path, int]] = []
        if not self.staging_locks.is_dir():
            return removed
        own = _OWNERS.get(str(self.staging_locks), (None,))[0]
        for lock in sorted(self.staging_locks.iterdir()):
            name = lock.name
            if name.endswith(".lock"):
                token = name[: -len(".lock")]
            elif name.startswith(".") and name.endswith(".new"):
                # a writer creates, locks and renames it within microseconds: only an old one is dead
                # (a fresh one may not be locked yet)
                try:
                    if time.time() - lock.lstat().st_mtime < 60:
                        continue
                except FileNotFoundError:
                    continue
                token = name[1: -len(".new")]
            else:
                continue
            if token == own:
                continue
            try:
                fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its writer runs
                if self.tmp.is_dir():
                    for entry in sorted(self.tmp.glob(f"{token}.*")):
                        removed.append((entry, remove_entry(entry)))
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return removed

    # --- blobs, continued --------------------------------------------------------------------

    def _commit_blob(self, tmp: Path, digest: str) -> bool:
        final = self.blob_path(digest)
        if final.is_file():  # stored meanwhile by a concurrent push: deduplicated
            tmp.unlink()
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return True

    def _replace_blob(self, tmp: Path, digest: str) -> None:
        """Put the good bytes in ``tmp`` (fsynced) in place of a damaged blob: one atomic rename."""
        final = self.blob_path(digest)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def put_file(self, src: Path, progress: Progress | None = None, *,
                 trusted: Callable[[str], bool] | None = None) -> Put:
        """Store a file's content, hashing and copying it in one pass.

        When a blob of that digest exists already, ``trusted(digest)`` says whether it may be used as
        is (the registry answers from the blob's stat stamp); otherwise (and always when ``trusted``
        is None) the existing blob is re-hashed, and a damaged one is replaced by the good bytes.
        """
        with os_errors(f"storing {src}"):
            fd, tmp = self._temp()
            try:
                h, size = hashlib.sha256(), 0
                with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        if progress:
                            progress(len(chunk))
                    out.flush()
                    digest = f"sha256:{h.hexdigest()}"
                    existing = self.blob_path(digest)
                    if existing.is_file():
                        if trusted is not None and trusted(digest):
                            tmp.unlink()
                            return Put(digest, size, "deduplicated")
                        try:
                            actual, _ = hash_file(existing)
                        except FileNotFoundError:  # removed meanwhile: store ours
                            actual = None
                        if actual == digest:
                            tmp.unlink()
                            return Put(digest, size, "verified")
                        os.fsync(out.fileno())
                        if actual is not None:
                            self._replace_blob(tmp, digest)
                            return Put(digest, size, "repaired")
                    else:
                        os.fsync(out.fileno())
                created = self._commit_blob(tmp, digest)
                return Put(digest, size, "stored" if created else "deduplicated")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def put_bytes(self, data: bytes) -> str:
        """Store bytes (a manifest); an existing blob of that digest is re-read, and replaced if damaged."""
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        path = self.blob_path(digest)
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == digest.removeprefix("sha256:"):
                return digest
            damaged = True
        except FileNotFoundError:
            damaged = False
        except OSError as e:
            raise storage_error(e, f"reading {path}") from e
        with os_errors("storing a manifest"):
            fd, tmp = self._temp()
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                if damaged:
                    self._replace_blob(tmp, digest)
                else:
                    self._commit_blob(tmp, digest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return digest

    def put_blob(self, digest: str, size: int, reader: BinaryIO, progress: Progress | None = None, *,
                 verified: bool = False) -> None:
        """Store the bytes read from ``reader`` as blob ``digest``, hashing them on arrival: bytes that do
        not hash to ``digest`` raise :class:`IntegrityError` and store nothing. (``verified``, the sender's
        word that the bytes were hashed, changes nothing here: what arrives is always hashed.)"""
        with os_errors(f"storing blob {digest}"):
            fd, tmp = self._temp()
            try:
                with os.fdopen(fd, "wb") as out:
                    actual, got = receive(reader, out.fileno(), progress)
                    if actual != digest:
                        raise IntegrityError(
                            f"the bytes received for blob {digest} hash to {actual} ({got} bytes, "
                            f"{size} expected); nothing was stored.\n  fix: the source's copy is damaged: run "
                            "`adapterhub verify` there, re-push the adapter to it, then retry.",
                            expected=digest, actual=actual)
                    os.fsync(out.fileno())
                if self.has_blob(digest):
                    try:
                        intact = hash_file(self.blob_path(digest))[0] == digest
                    except FileNotFoundError:
                        intact = False
                    if intact:
                        tmp.unlink()
                        return
                    self._replace_blob(tmp, digest)
                    return
                self._commit_blob(tmp, digest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def get_raw(self, digest: str) -> bytes | None:
        """The blob's bytes as stored (not checked), or None when it is missing."""
        path = self.blob_path(digest)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise storage_error(e, f"reading {path}") from e

    def get_bytes(self, digest: str) -> bytes:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise NotFoundError(f"blob {digest} is missing from {self.root}.\n  file: {path}\n"
                                "  fix: run `adapterhub verify` to list damaged versions; re-push them.") from e
        actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if actual != digest:
            raise corrupt(digest, actual, path)
        return data

    def open_blob(self, digest: str) -> BinaryIO:
        """A stream of the blob's bytes as stored (the reader hashes them)."""
        path = self.blob_path(digest)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError) as e:
            raise NotFoundError(f"blob {digest} is missing from {self.root}.\n  file: {path}\n"
                                "  fix: run `adapterhub verify` to list damaged versions; re-push them.") from e

    def list_blobs(self) -> Iterator[str]:
        if not self.blobs.is_dir():
            return
        for d in sorted(self.blobs.iterdir()):
            if d.is_dir() and len(d.name) == 2:
                for f in sorted(d.iterdir()):
                    yield f"sha256:{d.name}{f.name}"

    def list_blob_info(self) -> Iterator[BlobInfo]:
        for digest in self.list_blobs():
            try:
                st = self.blob_path(digest).stat()
            except FileNotFoundError:  # removed by a concurrent gc
                continue
            yield BlobInfo(digest, st.st_size, st.st_mtime)

    def delete_blob(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    # --- leftovers of interrupted writers -------------------------------------------------------------

    def staging_removable(self, entry: Path, now: float, grace: float) -> bool:
        _, alive = self.staging_owner(entry)
        if alive is not None:
            return not alive
        try:
            return now - entry.lstat().st_mtime >= grace
        except FileNotFoundError:
            return False

    def leftovers(self, grace: float) -> list[Leftover]:
        """Staging entries whose writer is gone, and those no live process owns older than ``grace``."""
        out: list[Leftover] = []
        if self.tmp.is_dir():
            now = time.time()
            for p in sorted(self.tmp.iterdir()):
                if self.staging_removable(p, now, grace):
                    out.append(Leftover("staging", str(p), entry_size(p), p))
        return out

    def remove_leftover(self, item: Leftover, grace: float) -> int:
        """Remove a planned leftover if it still is one; returns the bytes freed, or -1 when it was kept."""
        p = item.handle
        assert isinstance(p, Path)
        if (p.exists() or p.is_symlink()) and self.staging_removable(p, time.time(), grace):
            return remove_entry(p)
        return -1

    # --- small documents (refs) --------------------------------------------------------------

    def _doc(self, key: str) -> Path:
        return self.root / key

    def read_doc(self, key: str) -> str | None:
        try:
            return self._doc(key).read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write_tmp(self, text: str) -> Path:
        fd, tmp = self._temp()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create_doc(self, key: str, text: str) -> bool:
        """Create a document only if it does not exist (atomic: link(2) fails on an existing name)."""
        path = self._doc(key)
        with os_errors(f"writing {key}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_tmp(text)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(path.parent)
            return True

    def replace_doc(self, key: str, text: str) -> None:
        path = self._doc(key)
        with os_errors(f"writing {key}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_tmp(text)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(path.parent)

    def delete_doc(self, key: str) -> None:
        with os_errors(f"removing {key}"):
            self._doc(key).unlink(missing_ok=True)

    def list_docs(self, prefix: str) -> list[str]:
        """Keys directly under a prefix directory (names only), sorted."""
        d = self._doc(prefix)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))

    def walk_docs(self, prefix: str) -> list[str]:
        """Every document key below ``prefix`` (relative to the registry root), sorted."""
        d = self._doc(prefix)
        if not d.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in d.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def read_doc_token(self, key: str) -> tuple[str, str] | None:
        """(text, token) of a document; the token is what :meth:`swap_doc` compares (here: the text)."""
        text = self.read_doc(key)
        return None if text is None else (text, text)

    def swap_doc(self, key: str, text: str, token: str) -> bool:
        """Replace a document only if it still holds ``token`` (compare-and-swap, under ``locks/docs.lock``)."""
        with self.lock("docs.lock"):
            if self.read_doc(key) != token:
                return False
            self.replace_doc(key, text)
            return True


def entry_size(path: Path) -> int:
    """Bytes held by a file, or by the files below a directory (links not followed)."""
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def remove_entry(path: Path) -> int:
    """Remove a file or directory tree (a link is removed, never followed); returns the bytes freed."""
    size = entry_size(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return size


def corrupt(expected: str, actual: str, path: Path | str, ref: str | None = None) -> IntegrityError:
    where = f" of '{ref}'" if ref else ""
    return IntegrityError(
        f"Blob {expected.removeprefix('sha256:')[:12]}...{where} is corrupt (sha256 mismatch).\n"
        f"  file: {path}\n  expected: {expected}\n  actual:   {actual}\n"
        "  fix: re-push the adapter, or run `adapterhub verify` to list every damaged version.",
        path=path if isinstance(path, Path) else None, expected=expected, actual=actual)
