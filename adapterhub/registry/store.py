"""Content-addressed storage: immutable blobs named by sha256, and small mutable documents (refs).

The interface is deliberately small (put, get, exists, list, conditional create, atomic replace)
so that other backends can serve a registry. :class:`LocalStore` keeps git's layout:
``blobs/sha256/ab/cdef...`` written to a temp file in the same file system, fsynced, renamed, and
made read-only (0444).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from adapterhub.errors import IntegrityError, NotFoundError, StorageError, storage_error

CHUNK = 8 * 1024 * 1024
Progress = Callable[[int], None]


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


class Store(Protocol):
    """What a registry needs from storage."""

    def put_file(self, src: Path, progress: Progress | None = None) -> tuple[str, int, bool]: ...
    def put_bytes(self, data: bytes) -> str: ...
    def has_blob(self, digest: str) -> bool: ...
    def get_bytes(self, digest: str) -> bytes: ...
    def list_blobs(self) -> Iterator[str]: ...
    def delete_blob(self, digest: str) -> None: ...
    def read_doc(self, key: str) -> str | None: ...
    def create_doc(self, key: str, text: str) -> bool: ...
    def replace_doc(self, key: str, text: str) -> None: ...
    def delete_doc(self, key: str) -> None: ...
    def list_docs(self, prefix: str) -> list[str]: ...


class LocalStore:
    """A :class:`Store` in a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"

    # --- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.blobs / hexd[:2] / hexd[2:]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def _temp(self) -> tuple[int, Path]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        return fd, Path(name)

    def _commit_blob(self, tmp: Path, digest: str) -> bool:
        final = self.blob_path(digest)
        if final.is_file():  # stored already: deduplicated
            tmp.unlink()
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return True

    def put_file(self, src: Path, progress: Progress | None = None) -> tuple[str, int, bool]:
        """Store a file's content; returns (digest, size, created). Hashes and copies in one pass;
        ``created`` is True when this call wrote the blob (its content is then known to match)."""
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
                    if self.has_blob(digest):  # stored already: no fsync, drop the copy
                        tmp.unlink()
                        return digest, size, False
                    os.fsync(out.fileno())
                return digest, size, self._commit_blob(tmp, digest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def put_bytes(self, data: bytes) -> str:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if self.has_blob(digest):
            return digest
        with os_errors("storing a manifest"):
            fd, tmp = self._temp()
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                self._commit_blob(tmp, digest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return digest

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
        return open(self.blob_path(digest), "rb")

    def list_blobs(self) -> Iterator[str]:
        if not self.blobs.is_dir():
            return
        for d in sorted(self.blobs.iterdir()):
            if d.is_dir() and len(d.name) == 2:
                for f in sorted(d.iterdir()):
                    yield f"sha256:{d.name}{f.name}"

    def delete_blob(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

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

    def clear_tmp(self, older_than: float = 0.0) -> list[Path]:
        """Remove staging leftovers older than ``older_than`` seconds; returns what was removed."""
        import time

        removed = []
        if self.tmp.is_dir():
            now = time.time()
            for p in self.tmp.iterdir():
                try:
                    if now - p.lstat().st_mtime >= older_than:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                        removed.append(p)
                except FileNotFoundError:
                    continue
        return removed


def corrupt(expected: str, actual: str, path: Path, ref: str | None = None) -> IntegrityError:
    where = f" of '{ref}'" if ref else ""
    return IntegrityError(
        f"Blob {expected.removeprefix('sha256:')[:12]}...{where} is corrupt (sha256 mismatch).\n"
        f"  file: {path}\n  expected: {expected}\n  actual:   {actual}\n"
        "  fix: re-push the adapter, or run `adapterhub verify` to list every damaged version.",
        path=path, expected=expected, actual=actual)
