"""The registry's search index: a sqlite file derived from refs and manifests, rebuildable at any time.

Manifests and ref files are the source of truth. Every change to a name marks it dirty in the index
*before* the ref files change and refreshes it after; a name left dirty by a crash is refreshed from
its refs the next time the index is opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT, format TEXT, base_name TEXT, base_fingerprint TEXT, created_at TEXT,
    description TEXT, size INTEGER, num_parameters INTEGER,
    PRIMARY KEY (name, version));
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
INDEX_VERSION = "1"


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


def row_from_manifest(name: str, version: str, digest: str, manifest: dict[str, Any]) -> tuple:
    base = manifest.get("base") or {}
    return (name, version, digest, manifest.get("kind"), manifest.get("format"), base.get("name_or_path"),
            base.get("fingerprint"), manifest.get("created_at"), manifest.get("description"),
            manifest.get("size"), manifest.get("num_parameters"))


class Index:
    """The sqlite index of one registry."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fresh = not self.path.exists()
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.needs_rebuild = fresh or self._meta("index_version") != INDEX_VERSION

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

    def replace_name(self, name: str, rows: Iterable[tuple], tags: dict[str, str], keep: set[str]) -> None:
        """Make the index hold exactly these versions and tags for ``name``, then clear its dirty mark.

        ``rows`` are new or changed versions; ``keep`` lists already indexed versions that stay.
        """
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            existing = {r[0] for r in cur.execute("SELECT version FROM versions WHERE name=?", (name,))}
            for v in existing - keep:
                cur.execute("DELETE FROM versions WHERE name=? AND version=?", (name, v))
            for row in rows:
                seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions").fetchone()[0]
                cur.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (*row[:3], seq, *row[3:]))
            cur.execute("DELETE FROM tags WHERE name=?", (name,))
            cur.executemany("INSERT INTO tags VALUES (?,?,?)", [(name, t, v) for t, v in tags.items()])
            cur.execute("DELETE FROM dirty WHERE name=?", (name,))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def rebuild(self, names: Iterable[str], load: Callable[[str], tuple[list[tuple], dict[str, str]]]) -> None:
        """Drop everything and index every name again (``load(name) -> (rows, tags)``)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute("DELETE FROM versions")
            cur.execute("DELETE FROM tags")
            cur.execute("DELETE FROM dirty")
            seq = 0
            for name in names:
                rows, tags = load(name)
                for row in sorted(rows, key=lambda r: (r[7] or "", r[1])):
                    seq += 1
                    cur.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", (*row[:3], seq, *row[3:]))
                cur.executemany("INSERT INTO tags VALUES (?,?,?)", [(name, t, v) for t, v in tags.items()])
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
