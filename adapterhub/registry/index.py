"""The registry's search index: a sqlite file derived from refs and manifests, rebuildable at any time.

Manifests and ref files are the source of truth. Every change to a name marks it dirty in the index
*before* the ref files change and refreshes it after; a name left dirty by a crash is refreshed from
its refs the next time the index is opened. A version whose manifest cannot be read is not indexed;
it is recorded in ``damaged`` (and retried whenever its name is refreshed).

A registry that is not writable gets an in-memory copy of its index (repaired there if stale), so
reading never writes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT, format TEXT, base_name TEXT, base_fingerprint TEXT, created_at TEXT,
    description TEXT, size INTEGER, num_parameters INTEGER, content TEXT,
    PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS versions_content ON versions(name, content);
CREATE TABLE IF NOT EXISTS damaged (name TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL,
    problem TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS versions_kind ON versions(kind);
CREATE INDEX IF NOT EXISTS versions_base ON versions(base_name);
CREATE INDEX IF NOT EXISTS versions_name_seq ON versions(name, seq);
CREATE INDEX IF NOT EXISTS versions_seq ON versions(seq);
CREATE TABLE IF NOT EXISTS tags (name TEXT NOT NULL, tag TEXT NOT NULL, version TEXT NOT NULL,
    PRIMARY KEY (name, tag));
CREATE TABLE IF NOT EXISTS dirty (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS verified (digest TEXT PRIMARY KEY, stamp TEXT NOT NULL);
"""
INDEX_VERSION = "2"
_DERIVED_TABLES = ("versions", "tags", "dirty", "damaged")


@dataclass(slots=True)
class VersionInfo:
    """One version as listed: what ``list``/``show`` return (slots, not frozen: listing 10,000
    of them is a hot path, and frozen dataclasses construct ~5x slower)."""

    name: str
    version: str
    digest: str
    kind: str | None = None
    format: str | None = None
    base_name: str | None = None
    base_fingerprint: str | None = None
    created_at: str | None = None
    description: str | None = None
    size: int | None = None
    num_parameters: int | None = None
    tags: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["tags"] = list(self.tags)
        d["ref"] = self.ref
        return d


@dataclass(frozen=True, slots=True)
class DamagedVersion:
    """A version whose manifest cannot be read: listed nowhere, reported with ``problem``."""

    name: str
    version: str
    digest: str
    problem: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def content_key(manifest: dict[str, Any]) -> str:
    """What makes two versions hold the same adapter: kind, format, files (paths and hashes) and base."""
    data = {k: manifest.get(k) for k in ("kind", "format", "files", "base")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def row_from_manifest(name: str, version: str, digest: str, manifest: dict[str, Any]) -> tuple:
    base = manifest.get("base") or {}
    return (name, version, digest, manifest.get("kind"), manifest.get("format"), base.get("name_or_path"),
            base.get("fingerprint"), manifest.get("created_at"), manifest.get("description"),
            manifest.get("size"), manifest.get("num_parameters"), content_key(manifest))


class Index:
    """The sqlite index of one registry.

    ``readonly``: the registry cannot be written; the file (if readable) is copied into memory and
    every later change (repairs, stamps) stays there. ``path=None``: an index in memory only (a remote
    registry's, filled name by name as they are needed).
    """

    def __init__(self, path: Path | None, *, readonly: bool = False) -> None:
        self.path = None if path is None else Path(path)
        self.readonly = readonly
        if self.path is None:  # a remote registry's: in memory, filled name by name
            self.db = sqlite3.connect(":memory:", isolation_level=None)
            self.db.executescript(SCHEMA)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('index_version', ?)", (INDEX_VERSION,))
            self.needs_rebuild = False
            return
        if readonly:
            self.db = self._memory_copy(self.path)
            fresh = self.db is None
            if self.db is None:
                self.db = sqlite3.connect(":memory:", isolation_level=None)
        else:
            fresh = not self.path.exists()
            try:
                self.db = self._connect()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError):  # locked, disk full, I/O: not the file's fault
                    raise
                # not a database, or a malformed one: derived data, so it is dropped and rebuilt
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
                self.db, fresh = self._connect(), True
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not fresh and not set(_DERIVED_TABLES) <= tables and "meta" in tables:
            self.db.execute("DELETE FROM meta WHERE key='index_version'")  # a table dropped by hand: rebuild all
        if not fresh and self._meta_safe("index_version") != INDEX_VERSION:
            # an older layout: derived tables are dropped and rebuilt; verified stamps stay
            for table in _DERIVED_TABLES:
                self.db.execute(f"DROP TABLE IF EXISTS {table}")
            fresh = True
        self.db.executescript(SCHEMA)
        self.needs_rebuild = fresh or self._meta("index_version") != INDEX_VERSION

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # reads the header: "file is not a database" shows here
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # and a malformed schema here
        except sqlite3.Error:
            db.close()
            raise
        return db

    @staticmethod
    def _memory_copy(path: Path) -> sqlite3.Connection | None:
        """The index file copied into memory, opened read-only (never creating -wal/-shm files)."""
        if not path.is_file():
            return None
        for mode in ("ro", "ro&immutable=1"):
            src = None
            try:
                src = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, timeout=5)
                src.execute("SELECT count(*) FROM sqlite_master").fetchone()
                mem = sqlite3.connect(":memory:", isolation_level=None)
                src.backup(mem)
                return mem
            except sqlite3.Error:
                continue
            finally:
                if src is not None:
                    src.close()
        return None

    def _meta_safe(self, key: str) -> str | None:
        try:
            return self._meta(key)
        except sqlite3.Error:
            return None

    def close(self) -> None:
        self.db.close()

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def stamp(self, digest: str, stamp: str) -> None:
        """Record that the blob file with this stat signature was hashed and matched its digest."""
        self.db.execute("INSERT OR REPLACE INTO verified VALUES (?, ?)", (digest, stamp))

    def stamped(self, digest: str) -> str | None:
        row = self.db.execute("SELECT stamp FROM verified WHERE digest=?", (digest,)).fetchone()
        return row[0] if row else None

    def mark_dirty(self, name: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO dirty(name) VALUES (?)", (name,))

    def dirty_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM dirty")]

    def known(self, name: str) -> dict[str, str]:
        """version -> digest currently indexed for a name."""
        return dict(self.db.execute("SELECT version, digest FROM versions WHERE name=?", (name,)).fetchall())

    def all_known(self) -> dict[tuple[str, str], str]:
        """(name, version) -> digest of every indexed version."""
        return {(n, v): d for n, v, d in self.db.execute("SELECT name, version, digest FROM versions")}

    def same_content(self, name: str, content: str) -> list[tuple[str, str]]:
        """(version, digest) of the versions of ``name`` holding this content key, newest first."""
        return self.db.execute("SELECT version, digest FROM versions WHERE name=? AND content=? ORDER BY seq DESC",
                               (name, content)).fetchall()

    def damaged(self) -> list[DamagedVersion]:
        """Versions skipped because their manifest cannot be read."""
        return [DamagedVersion(*r) for r in
                self.db.execute("SELECT name, version, digest, problem FROM damaged ORDER BY name, version")]

    def replace_name(self, name: str, rows: Iterable[tuple], tags: dict[str, str], keep: set[str],
                     damaged: Iterable[DamagedVersion] = ()) -> None:
        """Make the index hold exactly these versions and tags for ``name``, then clear its dirty mark.

        ``rows`` are new or changed versions; ``keep`` lists already indexed versions that stay;
        ``damaged`` the versions whose manifest could not be read.
        """
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            existing = {r[0] for r in cur.execute("SELECT version FROM versions WHERE name=?", (name,))}
            for v in existing - keep:
                cur.execute("DELETE FROM versions WHERE name=? AND version=?", (name, v))
            for row in rows:
                seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions").fetchone()[0]
                cur.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (*row[:3], seq, *row[3:]))
            cur.execute("DELETE FROM tags WHERE name=?", (name,))
            cur.executemany("INSERT INTO tags VALUES (?,?,?)", [(name, t, v) for t, v in tags.items()])
            cur.execute("DELETE FROM damaged WHERE name=?", (name,))
            cur.executemany("INSERT INTO damaged VALUES (?,?,?,?)",
                            [(d.name, d.version, d.digest, d.problem) for d in damaged])
            cur.execute("DELETE FROM dirty WHERE name=?", (name,))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def rebuild(self, names: Iterable[str],
                load: Callable[[str], tuple[list[tuple], dict[str, str], list[DamagedVersion]]]) -> None:
        """Drop everything and index every name again (``load(name) -> (rows, tags, damaged)``)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for table in _DERIVED_TABLES:
                cur.execute(f"DELETE FROM {table}")
            seq = 0
            for name in names:
                rows, tags, damaged = load(name)
                for row in sorted(rows, key=lambda r: (r[7] or "", r[1])):
                    seq += 1
                    cur.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                (*row[:3], seq, *row[3:]))
                cur.executemany("INSERT INTO tags VALUES (?,?,?)", [(name, t, v) for t, v in tags.items()])
                cur.executemany("INSERT INTO damaged VALUES (?,?,?,?)",
                                [(d.name, d.version, d.digest, d.problem) for d in damaged])
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('index_version', ?)", (INDEX_VERSION,))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        self.needs_rebuild = False

    def query(self, *, pattern: str | None = None, kind: str | None = None, base: str | None = None,
              tag: str | None = None, name: str | None = None) -> list[VersionInfo]:
        sql = ["SELECT v.name, v.version, v.digest, v.kind, v.format, v.base_name, v.base_fingerprint, "
               "v.created_at, v.description, v.size, v.num_parameters, "
               "(SELECT group_concat(t.tag, ',') FROM tags t WHERE t.name=v.name AND t.version=v.version) "
               "FROM versions v WHERE 1=1"]
        args: list[Any] = []
        if name is not None:
            sql.append("AND v.name = ?")
            args.append(name)
        if pattern:
            sql.append("AND v.name GLOB ?")
            args.append(pattern)
        if kind:
            sql.append("AND v.kind = ?")
            args.append(kind)
        if base:
            sql.append("AND (v.base_name GLOB ? OR v.base_fingerprint LIKE ?)")
            args += [base, f"{base}%"]
        if tag:
            sql.append("AND EXISTS (SELECT 1 FROM tags t WHERE t.name=v.name AND t.version=v.version AND t.tag=?)")
            args.append(tag)
        sql.append("ORDER BY v.name, v.seq")
        out = []
        for r in self.db.execute(" ".join(sql), args):
            # tags are [a-z0-9._-]+, so a comma separates them safely
            out.append(VersionInfo(*r[:11], tags=tuple(sorted(r[11].split(","))) if r[11] else ()))
        return out
