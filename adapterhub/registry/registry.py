"""A versioned adapter registry on disk: names, immutable versions, movable tags, gc and verify.

Layout (see ``registry/FORMAT.md``)::

    <root>/registry.json                 format marker
    <root>/blobs/sha256/ab/cdef...        every file and every manifest, content-addressed, read-only
    <root>/refs/<ns|_>/<name>/versions/<version>   "sha256:<manifest digest>"
    <root>/refs/<ns|_>/<name>/tags/<tag>           "<version>"
    <root>/refs/<ns|_>/<name>/newest               "<version>" (what ``latest`` means unless tagged)
    <root>/snapshots/<digest>/            a version's files as symlinks to blobs (derived)
    <root>/index.sqlite                   search index (derived, rebuildable)
    <root>/locks/, <root>/tmp/            coordination and staging

A push writes blobs, then the manifest blob, then the version ref with an atomic create-if-absent:
killed at any moment, the version is either absent or complete. Pushes hold a shared lock that
``gc`` takes exclusively, so gc never removes the blobs of a push in flight.

One damaged version (its manifest blob missing or corrupt) never blocks the others: it is skipped
by the index and ``list`` (and reported by :meth:`Registry.damaged`), ``verify`` reports it, and
``rm`` removes it. A registry that is not writable can be read (``list``, ``show``, ``verify``,
``pull``, ``load``): nothing is locked or written; write commands fail with one clear error.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapterhub import _json
from adapterhub.adapter import Adapter, BaseModelRef, summarize
from adapterhub.errors import (
    AdapterHubError,
    AmbiguousReferenceError,
    IntegrityError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
    StorageError,
    VersionExistsError,
)
from adapterhub.registry.contents import LeftOut, select_files
from adapterhub.registry.index import DamagedVersion, Index, VersionInfo, content_key, row_from_manifest
from adapterhub.registry.refs import (
    LATEST,
    Ref,
    check_label,
    check_name,
    check_tag,
    check_target,
    is_integer_version,
    parse_ref,
)
from adapterhub.registry.store import (
    HashingReader,
    Leftover,
    LocalStore,
    Store,
    corrupt,
    hash_file,
    os_errors,
    prefetched,
)

FORMAT_NAME = "adapterhub-registry"
FORMAT_VERSION = 1
MANIFEST_SCHEMA = "adapterhub.manifest.v1"
ENV_VAR = "ADAPTERHUB_REGISTRY"
#: staging entries no live process owns (written by an older adapterhub) wait this long for gc
DEFAULT_TEMP_GRACE = 3600.0
#: on a remote store (no locks), gc removes unreferenced blobs and pending uploads only this old
DEFAULT_REMOTE_GRACE = 86400.0
#: a push to a remote that loses the race for a version number tries the next one, this many times
MAX_NUMBER_RACES = 1000
#: formats ``pull`` may write
PULL_FORMATS = ("peft", "adapters", "adapterhub")
_FULL_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_FORMAT_NAMES = {"peft": "PEFT", "adapters": "`adapters` library", "adapterhub": "adapterhub"}
Progress = Callable[[int], None]


def default_path() -> Path:
    """``$ADAPTERHUB_REGISTRY``, else ``$XDG_DATA_HOME/adapterhub/registry`` (``~/.local/share/...``)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "adapterhub" / "registry"


def canonical_json(data: Any) -> bytes:
    """The bytes a manifest is hashed as: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class PushResult:
    """What a push did.

    ``created`` is False when nothing new was stored: the named version already held identical
    content, or (``duplicate``) another version of the name holds it. ``left_out`` lists files of the
    directory that were not stored; ``repaired`` the files whose damaged blob the push replaced.
    """

    name: str
    version: str
    digest: str
    created: bool
    manifest: dict[str, Any]
    duplicate: bool = False
    left_out: tuple[LeftOut, ...] = ()
    repaired: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to one immutable version."""

    name: str
    version: str
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class PullFormat:
    """The format ``pull`` writes and why (``note`` is None when it is simply the one asked for)."""

    format: str
    stored: str
    note: str | None = None


@dataclass
class GcPlan:
    """What ``gc`` would remove; :meth:`execute` removes it (under the registry's exclusive lock).

    ``temp`` holds staging entries whose writer is gone, and those no live process owns that are
    older than the grace period; entries of running writers are never planned.
    ``expected_freed_size`` counts the planned blobs and staging entries.
    """

    registry: Registry
    blobs: list[str] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)
    temp: list[Path | str] = field(default_factory=list)
    expected_freed_size: int = 0
    temp_grace: float = DEFAULT_TEMP_GRACE
    grace: float = 0.0
    leftovers: list[Leftover] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"blobs": self.blobs, "snapshots": [str(p) for p in self.snapshots], "temp": [str(p) for p in self.temp],
                "expected_freed_size": self.expected_freed_size}

    def execute(self) -> GcResult:
        """Remove what the plan lists, re-checked under the lock; returns what was really removed."""
        return self.registry._gc_execute(self)


@dataclass
class GcResult:
    """What ``gc`` removed: ``freed_size`` bytes in ``blobs``, ``snapshots`` and staging ``temp`` entries.

    ``kept`` lists planned blobs that a push referenced between planning and removal; they stay and
    are not counted as freed.
    """

    blobs: list[str] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)
    temp: list[Path | str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    freed_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"blobs": self.blobs, "snapshots": [str(p) for p in self.snapshots], "temp": [str(p) for p in self.temp],
                "kept": self.kept, "freed_size": self.freed_size}


@dataclass(frozen=True)
class VerifyProblem:
    severity: str  # "error" | "orphan"
    what: str
    where: str
    message: str


@dataclass(frozen=True)
class VerifyReport:
    problems: tuple[VerifyProblem, ...]
    versions: int
    blobs: int

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def orphans(self) -> list[VerifyProblem]:
        return [p for p in self.problems if p.severity == "orphan"]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "versions": self.versions, "blobs": self.blobs,
                "problems": [p.__dict__ for p in self.problems]}


class Registry:
    """A registry rooted at a directory, created on first use.

    Example:
        >>> reg = Registry("/tmp/my-registry")                       # doctest: +SKIP
        >>> reg.push("out/my-lora", "team/sentiment").ref            # doctest: +SKIP
        'team/sentiment@1'
        >>> adapter = reg.load("team/sentiment")                     # doctest: +SKIP

    Safe for concurrent use by many processes on one machine (POSIX file locks). Any
    :class:`~adapterhub.registry.store.Store` can hold a registry: ``Registry(store)``, or a URL,
    ``Registry("s3://BUCKET/PREFIX")`` (endpoint from ``AWS_ENDPOINT_URL``; :mod:`adapterhub.registry.remotes`);
    there, concurrent writers rely on conditional writes alone (a version ref is created only if
    absent, tags move by compare-and-swap).
    """

    def __init__(self, path: str | Path | Store | None = None, *, create: bool = True) -> None:
        """Open the registry at ``path`` (default: :func:`default_path`); ``create=False`` refuses a place that
        holds no registry yet (:class:`NotFoundError`) instead of making one there."""
        if path is None and "://" in os.environ.get(ENV_VAR, ""):
            path = os.environ[ENV_VAR]
        if isinstance(path, str) and "://" in path:  # a URL: s3://BUCKET/PREFIX, file:///DIR
            from adapterhub.registry.remotes import open_store, parse_location

            loc = parse_location(path)
            path = loc.path if loc.kind == "file" else open_store(loc)
        if path is None or isinstance(path, str | os.PathLike):
            self.root: Path | None = (Path(path).expanduser() if path is not None else default_path()).absolute()
            self.store: Store = LocalStore(self.root)
        else:
            self.store = path
            self.root = getattr(path, "root", None) if path.local else None
        self.location = self.store.location
        self._index: Index | None = None
        self._manifests: dict[str, dict[str, Any]] = {}  # remote stores: verified manifests (immutable)
        self._indexed: set[str] = set()  # remote stores: names indexed so far (the index fills on demand)
        self._init_layout(create)
        self.writable = self.store.check_writable() if self.store.local else self.store.writable

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    # --- layout, locks, index ------------------------------------------------------------------

    def _init_layout(self, create: bool = True) -> None:
        where = self.location
        with os_errors(f"creating the registry at {where}"):
            try:
                text = self.store.read_doc("registry.json")
            except (IsADirectoryError, UnicodeDecodeError) as e:
                raise RegistryError(f"{where}/registry.json is damaged ({e}).\n  fix: restore it: "
                                    f'{{"format": "{FORMAT_NAME}", "version": {FORMAT_VERSION}}}') from e
            if text is not None:
                try:
                    doc = _json.loads(text.encode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise RegistryError(f"{where}/registry.json is damaged ({e}).\n  fix: restore it: "
                                        f'{{"format": "{FORMAT_NAME}", "version": {FORMAT_VERSION}}}') from e
                if not isinstance(doc, dict) or (doc.get("format"), doc.get("version")) != (FORMAT_NAME,
                                                                                           FORMAT_VERSION):
                    raise RegistryError(f"{where} is a registry of format {doc!r}; this adapterhub reads "
                                        f"{FORMAT_NAME} v{FORMAT_VERSION}.\n  fix: use the adapterhub version that "
                                        "made it, or another --registry path.")
                return
            if not create:
                raise NotFoundError(f"no adapterhub registry at {where}.\n  fix: check the path (--registry or "
                                    "$ADAPTERHUB_REGISTRY); `adapterhub push` creates a registry there.")
            if isinstance(self.store, LocalStore):
                from adapterhub.paths import registry_enclosing

                outer = registry_enclosing(self.store.root)
                if outer is not None:
                    raise RegistryError(f"{where} lies inside the adapterhub registry at {outer}; a registry made "
                                        "there would corrupt that one.\n  fix: choose a path outside it.")
            if self.store.foreign_entries():
                raise RegistryError(f"{where} exists, is not empty and is not an adapterhub registry.\n"
                                    "  fix: choose another --registry path.")
            if isinstance(self.store, LocalStore):
                self.store.make_layout()
            marker_text = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION}) + "\n"
            self.store.create_doc("registry.json", marker_text)  # atomic: a concurrent creator may win

    def _require_writable(self, what: str) -> None:
        """Refuse a write command on a registry this process cannot write, before touching anything."""
        if not self.writable:
            raise StorageError(
                f"cannot {what}: the registry at {self.location} is read-only.\n  fix: use a registry you can write "
                "to (--registry PATH or $ADAPTERHUB_REGISTRY), or ask its owner to make it writable; reading "
                "(list, show, verify, pull) works as is.")

    def _lock(self, rel: str, exclusive: bool = True):  # noqa: ANN202
        return self.store.lock(rel, exclusive)

    def _name_lock(self, name: str):  # noqa: ANN202
        return self._lock(f"names/{self._name_dir(name)}.lock")

    def _gc_shared(self):  # noqa: ANN202
        return self._lock("gc.lock", exclusive=False)

    def _open_index(self) -> Index:
        if not isinstance(self.store, LocalStore):  # in memory, filled name by name on demand
            return Index(None)
        assert self.root is not None
        if not self.writable:
            index = Index(self.root / "index.sqlite", readonly=True)
            if index.needs_rebuild:
                self._rebuild(index)
            else:  # nobody repairs a read-only index: check it against the refs in memory
                for name in self._stale_names(index):
                    index.mark_dirty(name)
            return index
        # one process at a time creates the file, switches it to WAL and rebuilds it: concurrent
        # first opens otherwise fail with "database is locked" on the journal-mode switch
        with self._lock("index.lock"):
            index = Index(self.root / "index.sqlite")
            if index.needs_rebuild:
                self._rebuild(index)
        return index

    def _stale_names(self, index: Index) -> set[str]:
        """Names whose indexed versions differ from the refs (read-only registries only: a writable
        one keeps its index current through dirty marks)."""
        known = index.all_known()
        damaged = {(d.name, d.version): d.digest for d in index.damaged()}
        actual = {(n, v): d for n in self.names() for v, d in self._versions(n).items()}
        stale = {n for (n, v), d in actual.items() if known.get((n, v), damaged.get((n, v))) != d}
        stale |= {n for (n, v) in known.keys() - actual.keys()}
        stale |= {n for (n, v) in damaged.keys() - actual.keys()}
        return stale

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = self._open_index()
        if not self.store.local:
            return self._index
        for name in self._index.dirty_names():
            with self._name_lock(name):
                self._refresh(name)
        return self._index

    def _index_for(self, names: Sequence[str] | None = None) -> Index:
        """The index, with ``names`` (None: every name) indexed: a remote store's index lives in memory
        and learns a name the first time it is needed."""
        index = self.index
        if not self.store.local:
            for name in self.names() if names is None else names:
                if name not in self._indexed:
                    self._refresh(name)
                    self._indexed.add(name)
        return index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def reindex(self) -> None:
        """Rebuild the search index from refs and manifests (the source of truth).

        Versions whose manifest cannot be read are skipped and recorded (:meth:`damaged`).
        """
        self._require_writable("rebuild the index")
        if self._index is None:
            self._index = self._open_index()
        with self._lock("index.lock"):
            self._rebuild(self._index)

    def _index_rows(self, name: str, versions: dict[str, str],
                    skip: set[str] = frozenset()) -> tuple[list[tuple], list[DamagedVersion]]:
        rows, damaged = [], []
        for v, d in versions.items():
            if v in skip:
                continue
            try:
                rows.append(row_from_manifest(name, v, d, self._manifest(d, f"{name}@{v}")))
            except IntegrityError as e:
                if not _FULL_DIGEST.fullmatch(d):
                    problem = f"its version file holds {d[:40]!r}, not a manifest digest"
                else:
                    state = ("missing" if not self.store.has_blob(d) else
                             "corrupt (sha256 mismatch)" if e.actual else "not a valid manifest")
                    problem = f"its manifest blob {d[:19]}... is {state}"
                damaged.append(DamagedVersion(name, v, d, problem))
        return rows, damaged

    def _rebuild(self, idx: Index) -> None:
        def load(name: str) -> tuple[list[tuple], dict[str, str], list[DamagedVersion]]:
            versions = self._versions(name)
            rows, damaged = self._index_rows(name, versions)
            return rows, self._tags(name, versions), damaged

        idx.rebuild(self.names(), load)

    def _refresh(self, name: str) -> None:
        """Re-index one name from its refs (caller holds the name's lock)."""
        idx = self._index
        assert idx is not None
        versions = self._versions(name)
        known = idx.known(name)
        keep = {v for v, d in versions.items() if known.get(v) == d}
        rows, damaged = self._index_rows(name, versions, keep)
        rows.sort(key=lambda r: (r[7] or "", r[1]))
        idx.replace_name(name, rows, self._tags(name, versions), keep, damaged)

    def damaged(self) -> list[DamagedVersion]:
        """Versions the index skipped because their manifest is missing or corrupt (``verify`` checks
        everything; this is what ``list`` warns about)."""
        return self._index_for(None).damaged()

    # --- refs ----------------------------------------------------------------------------------

    @staticmethod
    def _name_dir(name: str) -> str:
        ns, _, short = name.rpartition("/")
        return f"{ns or '_'}/{short}"

    def _key(self, name: str, *parts: str) -> str:
        return "/".join(("refs", self._name_dir(name), *parts))

    def names(self) -> list[str]:
        """Every name that has at least one version."""
        out = []
        if not self.store.local:  # one recursive listing instead of one per name
            seen = set()
            for key in self.store.walk_docs("refs"):
                parts = key.split("/")
                if len(parts) == 5 and parts[3] == "versions":
                    ns, short = parts[1], parts[2]
                    seen.add(short if ns == "_" else f"{ns}/{short}")
            return sorted(seen)
        for ns in self.store.list_docs("refs"):
            for short in self.store.list_docs(f"refs/{ns}"):
                if self.store.list_docs(f"refs/{ns}/{short}/versions"):
                    out.append(short if ns == "_" else f"{ns}/{short}")
        return out

    def _versions(self, name: str) -> dict[str, str]:
        out = {}
        for v in self.store.list_docs(self._key(name, "versions")):
            digest = (self.store.read_doc(self._key(name, "versions", v)) or "").strip()
            if digest:
                out[v] = digest
        return out

    def _explicit_tags(self, name: str) -> dict[str, str]:
        out = {}
        for t in self.store.list_docs(self._key(name, "tags")):
            v = (self.store.read_doc(self._key(name, "tags", t)) or "").strip()
            if v:
                out[t] = v
        return out

    def _newest(self, name: str, versions: dict[str, str] | None = None) -> str | None:
        versions = self._versions(name) if versions is None else versions
        newest = (self.store.read_doc(self._key(name, "newest")) or "").strip()
        if newest in versions:
            return newest
        if not versions:
            return None

        # the newest file is missing or names a removed version: fall back to creation time
        def created(v: str) -> tuple[str, str]:
            try:
                return (self._manifest(versions[v]).get("created_at") or "", v)
            except IntegrityError:  # a damaged version sorts first: never the newest
                return ("", v)

        return max(versions, key=created)

    def _tags(self, name: str, versions: dict[str, str]) -> dict[str, str]:
        tags = {t: v for t, v in self._explicit_tags(name).items() if v in versions}
        if LATEST not in tags and (newest := self._newest(name, versions)):
            tags[LATEST] = newest
        return tags

    def _manifest(self, digest: str, ref: str | None = None) -> dict[str, Any]:
        """The manifest blob, hash-checked and parsed.

        Raises:
            IntegrityError: missing, corrupt, not JSON or not a manifest; the fix names ``rm``.
        """
        of = f" of '{ref}'" if ref else ""
        fix = (f"  fix: `adapterhub rm {ref}` removes the damaged version (push the adapter again to store it "
               "anew); `adapterhub verify` lists every damaged version.") if ref else \
            "  fix: `adapterhub verify` lists every damaged version; `adapterhub rm NAME@VERSION` removes one."
        if not _FULL_DIGEST.fullmatch(digest):  # a hand-edited ref: never let it name a path
            raise IntegrityError(f"the version file{of} holds {digest[:80]!r}, not a manifest digest.\n{fix}",
                                 expected=digest)
        if digest in self._manifests:
            return self._manifests[digest]
        where = self.store.describe(digest)
        path = Path(where) if self.store.local else None
        try:
            data = self.store.get_raw(digest)
        except StorageError as e:
            raise IntegrityError(f"the manifest{of} cannot be read ({e.strerror or e}).\n  file: {where}\n{fix}",
                                 path=path, expected=digest) from e
        if data is None:
            raise IntegrityError(f"the manifest{of} is missing (blob {digest}).\n  file: {where}\n{fix}",
                                 path=path, expected=digest)
        actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if actual != digest:
            raise IntegrityError(f"the manifest{of} is corrupt (sha256 mismatch).\n  file: {where}\n"
                                 f"  expected: {digest}\n  actual:   {actual}\n{fix}",
                                 path=path, expected=digest, actual=actual)
        try:
            manifest = _json.loads(data)
        except ValueError as e:
            raise IntegrityError(f"the manifest{of} ({digest}) is not valid JSON ({e}).\n  file: {where}\n{fix}",
                                 path=path, expected=digest) from e
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not (isinstance(files, list) and all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                                and isinstance(f.get("sha256"), str) for f in files)):
            raise IntegrityError(f"the manifest{of} ({digest}) is not an adapterhub manifest.\n  file: {where}\n{fix}",
                                 path=path, expected=digest)
        if not self.store.local:
            self._manifests[digest] = manifest
        return manifest

    # --- resolve, show, list -------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> Resolved:
        """The version a reference names.

        ``NAME@sha256:HEX`` takes the full digest or a prefix of at least 8 hex digits that only one
        version of the name has.

        Raises:
            InvalidReferenceError: malformed reference.
            AmbiguousReferenceError: a digest prefix several versions share (they are listed).
            NotFoundError: no such name, version, tag or digest.
        """
        r = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self._versions(r.name)
        if not versions:
            raise NotFoundError(f"no adapter named '{r.name}' in {self.location}.\n  fix: `adapterhub list` shows "
                                "what is there; `adapterhub push DIR NAME` adds one.", ref=str(r))
        if r.digest:
            hits = sorted(((v, d) for v, d in versions.items() if d.startswith(r.digest)),
                          key=lambda vd: _version_key(vd[0]))
            if len(hits) == 1:
                return Resolved(r.name, *hits[0])
            if hits:
                listed = ", ".join(f"{r.name}@{v} ({d[:19]}...)" for v, d in hits)
                raise AmbiguousReferenceError(
                    f"'{r}' is ambiguous: {len(hits)} versions have a digest starting with {r.digest}: {listed}.\n"
                    "  fix: give more hex digits of the digest, or the version.",
                    ref=str(r), candidates=tuple(f"{r.name}@{v}" for v, _ in hits))
            raise NotFoundError(f"no version of '{r.name}' has manifest digest {r.digest}"
                                f"{'' if len(r.digest) == 71 else '...'}.\n  fix: `adapterhub list {r.name} --json` "
                                "shows each version's digest.", ref=str(r))
        label = r.label or LATEST
        if label in versions:
            return Resolved(r.name, label, versions[label])
        tags = self._tags(r.name, versions)
        if label in tags:
            return Resolved(r.name, tags[label], versions[tags[label]])
        raise NotFoundError(f"'{r.name}' has no version or tag '{label}' (versions: "
                            f"{', '.join(sorted(versions, key=_version_key))}; tags: {', '.join(sorted(tags))}).\n"
                            f"  fix: use one of them, e.g. {r.name}@{max(versions, key=_version_key)}.", ref=str(r))

    def manifest(self, ref: str | Ref) -> dict[str, Any]:
        """The manifest of the version a reference names (hash-checked)."""
        res = self.resolve(ref)
        return self._manifest(res.digest, res.ref)

    def show(self, ref: str | Ref) -> dict[str, Any]:
        """Manifest plus where it lives (digest, the tags that point at it now) and ``adapter``: what
        ``inspect`` says about the stored adapter (r, alpha, targets, ...), read from the stored
        weights' headers (``adapter_error`` says why when they cannot be read)."""
        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        tags = sorted(t for t, v in self._tags(res.name, self._versions(res.name)).items() if v == res.version)
        info: dict[str, Any] = {"ref": res.ref, "digest": res.digest, "current_tags": tags, "manifest": manifest}
        try:
            summary = summarize(self.load(res, verify=False, allow_pickle=False))
        except AdapterHubError as e:
            info["adapter"], info["adapter_error"] = None, str(e).splitlines()[0]
        else:
            summary.pop("size_on_disk", None)
            summary["source"] = res.ref
            info["adapter"] = summary
        return info

    def list(self, pattern: str | None = None, *, kind: str | None = None, base: str | None = None,
             tag: str | None = None) -> list[VersionInfo]:
        """Versions matching a name glob (``team/*``), kind, base (name glob or fingerprint prefix) and tag.

        Damaged versions are not listed; :meth:`damaged` returns them.
        """
        return self._index_for(None).query(pattern=pattern, kind=kind, base=base, tag=tag)

    # --- push ----------------------------------------------------------------------------------

    def push(self, source: str | Path | Adapter, target: str, *, tags: Sequence[str] = (), description: str = "",
             metrics: dict[str, Any] | None = None, base: str | Path | None = None,
             parents: Sequence[dict[str, Any]] = (), recipe: dict[str, Any] | None = None,
             allow_pickle: bool = False, include: Sequence[str] = (), include_all: bool = False,
             allow_duplicate: bool = False, progress: Progress | None = None,
             origin: dict[str, Any] | None = None) -> PushResult:
        """Store an adapter directory (any readable format) or Adapter as ``NAME[@VERSION]``.

        Without a version the next integer is used. With ``base``, the compatibility check runs
        first and an incompatible adapter is refused; the base's fingerprint is recorded.

        Only what an adapter directory is gets stored (configs, the format's weights, README,
        tokenizer files, templates: :mod:`adapterhub.registry.contents`); ``include`` globs or
        ``include_all`` add more, and ``PushResult.left_out`` lists the rest. Pickles need
        ``allow_pickle``. When another version of the name already holds identical content (same
        kind, format, files and base), nothing is pushed and that version is returned with
        ``duplicate=True``, unless ``allow_duplicate``. An existing blob whose stat stamp changed
        since it was last hashed is re-hashed, and replaced if damaged (``PushResult.repaired``).
        ``origin`` is recorded in the manifest as where the adapter came from (a Hub repo and commit).
        With ``base``, the base's parameter bytes are recorded too (``base_size``: what ``du`` prices a
        full merged copy at).

        On a remote store the version is numbered exactly as locally; a push that loses the race for
        a number to a concurrent publisher takes the next one.

        Raises:
            InvalidReferenceError: bad name, version or tag (before anything is written).
            VersionExistsError: the version exists with other content.
            CompatibilityError: the adapter does not fit ``base``.
            UnsafeLinkError: a file to store is a symbolic link leaving the directory.
            PickleRefusedError: pickle weights (or an ``include`` naming a pickle) without ``allow_pickle``.
            StorageError: disk full, permission denied or a read-only registry (nothing half-written
                is visible).
        """
        name, version = check_target(target)
        for t in tags:
            check_tag(t)
        self._require_writable("push")
        from adapterhub.formats import detect, read_adapter, write_adapter

        with self._gc_shared():
            if isinstance(self.store, LocalStore):
                self.store.remove_dead_staging()
            staging = None
            try:
                if isinstance(source, Adapter):
                    staging = (self.store.staging_dir("push-") if isinstance(self.store, LocalStore)
                               else Path(tempfile.mkdtemp(prefix="adapterhub-push-")))
                    write_adapter(source, staging / "adapter", format="adapterhub")
                    src_dir, fmt, adapter = staging / "adapter", "adapterhub", source
                else:
                    src_dir = Path(source)
                    fmt = detect(src_dir)
                    adapter = read_adapter(src_dir, format=fmt, allow_pickle=allow_pickle)
                selection = select_files(src_dir, fmt, include=tuple(include), include_all=include_all,
                                         allow_pickle=allow_pickle)
                from adapterhub.finite import ensure_finite

                ensure_finite(adapter, label=str(source))  # NaN/Inf weights are refused (no torch needed)
                base_ref = adapter.base
                base_size = None
                if base is not None:
                    from adapterhub.base import BaseCheckpoint
                    from adapterhub.compose.checks import check_adapter

                    ckpt = BaseCheckpoint.open(base)
                    base_size = sum(t.nbytes for t in ckpt.tensors.values())
                    check_adapter(adapter, ckpt, subject=str(source), scan_values=False).raise_for_errors()
                    base_ref = ckpt.identity(base_ref)
                files, repaired = self._store_files(src_dir, selection.files, progress)
                content = {
                    "kind": adapter.kind, "format": fmt, "files": files,
                    "spec": _spec_dict(adapter), "base": json.loads(json.dumps(asdict(base_ref))),
                }
                extra = {k: v for k, v in (("base_size", base_size), ("origin", origin)) if v is not None}
                result = self._commit(name, version, content, adapter, tags=list(tags),
                                      description=description, metrics=metrics or {}, parents=list(parents),
                                      recipe=recipe, allow_duplicate=allow_duplicate, extra=extra)
                return replace(result, left_out=selection.left_out, repaired=tuple(repaired))
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)

    def _blob_trusted(self, digest: str) -> bool:
        """An existing blob may be used as is when its stat stamp equals the one recorded when it was
        last hashed (any write, chmod or replacement changes the stamp). A remote blob has no stamp."""
        stamp = self._stat_stamp(digest)
        index = self._index if self._index is not None else self.index
        return stamp is not None and index.stamped(digest) == stamp

    def _store_files(self, src_dir: Path, rels: Sequence[str],
                     progress: Progress | None) -> tuple[list[dict[str, Any]], list[str]]:
        files, repaired = [], []
        for rel in rels:
            put = self.store.put_file(src_dir / rel, progress, trusted=self._blob_trusted)
            if put.hashed:  # written or re-hashed by this call: its content is known to match
                self._stamp(put.digest)
            if put.status == "repaired":
                repaired.append(rel)
            files.append({"path": rel, "sha256": put.digest.removeprefix("sha256:"), "size": put.size})
        if not files:
            raise RegistryError(f"{src_dir} has no files to push.\n  fix: pass the adapter's directory.")
        return files, repaired

    def _commit(self, name: str, version: str | None, content: dict[str, Any], adapter: Adapter, *,
                tags: list[str], description: str, metrics: dict[str, Any], parents: list[dict[str, Any]],
                recipe: dict[str, Any] | None, allow_duplicate: bool = False,
                extra: dict[str, Any] | None = None) -> PushResult:
        given = version
        with self._name_lock(name):
            for _ in range(MAX_NUMBER_RACES):
                index = self.index
                if not self.store.local:  # other publishers may have pushed since we last looked
                    self._refresh(name)
                    self._indexed.add(name)
                versions = self._versions(name)
                explicit_tags = self._explicit_tags(name)
                if given is not None and given in versions:
                    old = self._manifest(versions[given], f"{name}@{given}")
                    if _same_content(old, content):
                        return PushResult(name, given, versions[given], False, old)
                    raise VersionExistsError(
                        f"{name}@{given} already exists with different content; versions are immutable.\n"
                        f"  fix: push without @VERSION to get the next number, or choose a new version.",
                        ref=f"{name}@{given}")
                if not allow_duplicate:
                    for v, d in index.same_content(name, content_key(content)):
                        if versions.get(v) == d:
                            try:
                                old = self._manifest(d, f"{name}@{v}")
                            except IntegrityError:
                                continue
                            return PushResult(name, v, d, False, old, duplicate=True)
                version = given if given is not None else next_version(versions)
                clash = [t for t in tags if t in versions] + ([version] if version in explicit_tags else [])
                if clash:
                    raise InvalidReferenceError(f"'{clash[0]}' is already used by '{name}' as a "
                                                f"{'version' if clash[0] in versions else 'tag'}; tags and versions "
                                                "share one namespace per name.\n  fix: choose another name for it.",
                                                ref=f"{name}@{clash[0]}")
                manifest = {
                    "schema": MANIFEST_SCHEMA, "name": name, "version": version, **content,
                    "created_at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                    "description": description, "tags": sorted(set(tags)), "metrics": metrics,
                    "parents": parents, "recipe": recipe,
                    "size": sum(f["size"] for f in content["files"]), "num_parameters": adapter.num_parameters,
                    **(extra or {}),
                }
                digest = self.store.put_bytes(canonical_json(manifest))
                index.mark_dirty(name)
                # newest first: if the ref is never created, _newest() falls back to creation times
                self._set_newest(name, version)
                key = self._key(name, "versions", version)
                if self.store.create_doc(key, digest + "\n") or (self.store.read_doc(key) or "").strip() == digest:
                    break  # created; or a retried request whose first attempt created it (same bytes): a success
                # lost the race for this number (a remote store, or a writer that takes no lock):
                # look again; a named version is then compared, a numbered push takes the next number
            else:
                raise VersionExistsError(f"{name}: lost the race for a version number {MAX_NUMBER_RACES} times.\n"
                                         "  fix: retry the push.", ref=name)
            for t in tags:
                self._set_doc(self._key(name, "tags", t), version + "\n")
            self._refresh(name)
            return PushResult(name, version, digest, True, manifest)

    def _set_doc(self, key: str, text: str) -> None:
        """Write a movable ref: an atomic replace on a local store, compare-and-swap on a remote one
        (a concurrent change is re-read, never overwritten unseen)."""
        if self.store.local:
            self.store.replace_doc(key, text)
            return
        self._swap(key, lambda old: text)

    def _swap(self, key: str, change: Callable[[str | None], str | None]) -> None:
        """Compare-and-swap loop: ``change(current text or None)`` gives the new text (None: leave it)."""
        for _ in range(MAX_NUMBER_RACES):
            cur = self.store.read_doc_token(key)
            new = change(None if cur is None else cur[0])
            if new is None or (cur is not None and cur[0] == new):
                return
            if (self.store.create_doc(key, new) if cur is None else self.store.swap_doc(key, new, cur[1])):
                return
        raise RegistryError(f"{key} kept changing under {MAX_NUMBER_RACES} compare-and-swap attempts; retry.")

    def _set_newest(self, name: str, version: str) -> None:
        """Point ``newest`` at ``version``. On a remote store (no name lock) by compare-and-swap, and never
        back from an integer version to a smaller one: concurrent publishers leave it at the largest."""
        key = self._key(name, "newest")
        if self.store.local:
            self.store.replace_doc(key, version + "\n")
            return

        def advance(old: str | None) -> str | None:
            cur = (old or "").strip()
            if is_integer_version(cur) and is_integer_version(version) and int(cur) > int(version):
                return None
            return version + "\n"

        self._swap(key, advance)

    # --- tags, rm ------------------------------------------------------------------------------

    def tag(self, ref: str, tag: str) -> Resolved:
        """Point ``tag`` at the version ``ref`` names (moving it if it exists).

        Tags that read as numbers (``1``, ``01``, ``1.0``, ``1e3``, ``inf``, ``nan``), booleans or
        digests are refused: numbers are versions, and the others change meaning in YAML/JSON tools.
        """
        check_tag(tag)
        res = self.resolve(ref)
        self._require_writable("tag")
        index = self._index_for([res.name])  # refreshes dirty names, which takes name locks: before taking ours
        with self._gc_shared(), self._name_lock(res.name):
            versions = self._versions(res.name)
            if tag in versions:
                raise InvalidReferenceError(f"'{tag}' is a version of '{res.name}', it cannot be a tag.\n  fix: choose "
                                            "another tag name.", ref=tag)
            if res.version not in versions:
                raise NotFoundError(f"{res.ref} was removed meanwhile.\n  fix: `adapterhub list {res.name}` shows the "
                                    "versions left.", ref=res.ref)
            index.mark_dirty(res.name)
            self._set_doc(self._key(res.name, "tags", tag), res.version + "\n")
            self._refresh(res.name)
        return res

    def untag(self, name: str, tag: str) -> None:
        """Remove a tag (``latest`` then follows the newest push again)."""
        check_name(name)
        check_label(tag, "tag")
        self._require_writable("untag")
        index = self._index_for([name])
        with self._gc_shared(), self._name_lock(name):
            if tag not in self._explicit_tags(name):
                if tag == LATEST:
                    raise NotFoundError(f"'{name}@latest' is not pinned; it already follows the newest push.\n"
                                        "  fix: nothing to do.", ref=f"{name}@{tag}")
                raise NotFoundError(f"'{name}' has no tag '{tag}'.\n  fix: `adapterhub list {name}` shows its tags.",
                                    ref=f"{name}@{tag}")
            index.mark_dirty(name)
            self.store.delete_doc(self._key(name, "tags", tag))
            self._refresh(name)

    def rm(self, ref: str) -> Resolved:
        """Remove one version and the tags pointing at it; its blobs go at the next ``gc``.

        Works on a damaged version too (its manifest is not read): this is how one is removed.
        """
        r = parse_ref(ref)
        if r.label is None and r.digest is None:
            raise InvalidReferenceError(f"say which version of '{r.name}' to remove.\n  fix: `adapterhub rm "
                                        f"{r.name}@VERSION` (`adapterhub list {r.name}` shows them).", ref=ref)
        res = self.resolve(r)
        if r.label is not None and r.label != res.version:  # a tag: removing what it points at is rarely meant
            raise InvalidReferenceError(
                f"'{ref}' is a tag (it points at {res.ref}); rm takes a version.\n"
                f"  fix: `adapterhub untag {res.name} {r.label}` removes the tag; `adapterhub rm {res.ref}` removes "
                "the version.", ref=ref)
        self._require_writable("remove a version")
        index = self._index_for([res.name])
        with self._gc_shared(), self._name_lock(res.name):
            index.mark_dirty(res.name)
            for t, v in self._explicit_tags(res.name).items():
                if v == res.version:
                    self.store.delete_doc(self._key(res.name, "tags", t))
            self.store.delete_doc(self._key(res.name, "versions", res.version))
            versions = self._versions(res.name)
            if versions:
                newest = self._newest(res.name, versions)
                self._set_doc(self._key(res.name, "newest"), f"{newest}\n")
            else:
                self.store.delete_doc(self._key(res.name, "newest"))
            self._refresh(res.name)
        return res

    # --- pull, load ----------------------------------------------------------------------------

    def _stat_stamp(self, digest: str) -> str | None:
        """The blob's stat stamp (local stores only: a remote blob is never trusted without hashing)."""
        return self.store.stat_stamp(digest) if isinstance(self.store, LocalStore) else None

    def _stamp(self, digest: str) -> None:
        stamp = self._stat_stamp(digest)
        if stamp is not None:
            self.index.stamp(digest, stamp)

    def _verified_blob(self, digest: str, ref: str, progress: Progress | None, *, trust_stamp: bool = False) -> Path:
        """The blob's path after checking its sha256 (local stores). With ``trust_stamp``, a blob whose
        inode, size, mtime and ctime are unchanged since it was last hashed is not hashed again."""
        assert isinstance(self.store, LocalStore)
        path = self.store.blob_path(digest)
        if not path.is_file():
            raise IntegrityError(f"blob {digest} of '{ref}' is missing.\n  file: {path}\n"
                                 "  fix: re-push the adapter; `adapterhub verify` lists every damaged version.",
                                 path=path, expected=digest)
        if trust_stamp and (stamp := self._stat_stamp(digest)) is not None and self.index.stamped(digest) == stamp:
            return path
        actual, _ = hash_file(path, progress)
        if actual != digest:
            raise corrupt(digest, actual, path, ref)
        self._stamp(digest)
        return path

    def check_blob(self, digest: str, ref: str, progress: Progress | None = None) -> None:
        """Read every byte of a blob and check its sha256, on any store.

        Raises:
            IntegrityError: missing or corrupt; the message names where it lives.
        """
        if isinstance(self.store, LocalStore):
            self._verified_blob(digest, ref, progress)
            return
        self._download(digest, None, ref, progress)

    def _download(self, digest: str, dest: Path | None, ref: str, progress: Progress | None) -> None:
        """Stream a blob of a remote store into ``dest`` (or nowhere), hashing every byte on arrival."""
        where = self.store.describe(digest)
        try:
            stream = self.store.open_blob(digest)
        except NotFoundError as e:
            raise IntegrityError(f"blob {digest} of '{ref}' is missing.\n  file: {where}\n"
                                 "  fix: re-push the adapter there; `adapterhub verify` lists every damaged version.",
                                 expected=digest) from e
        reader = HashingReader(stream, progress)
        try:
            if dest is None:
                for _ in prefetched(reader):
                    pass
            else:
                with open(dest, "wb") as out:
                    for chunk in prefetched(reader):
                        out.write(chunk)
        finally:
            stream.close()
        if reader.digest != digest:
            raise corrupt(digest, reader.digest, where, ref)

    def snapshot(self, ref: str | Ref, *, verify: bool = True) -> Path:
        """A directory holding the version's files (symlinks into the blob store), hash-checked.

        A read-only registry gets a private snapshot in the system's temp directory instead (removed
        when the process exits).
        """
        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        if not isinstance(self.store, LocalStore):
            return self._private_snapshot(res.digest, manifest, res.ref)
        assert self.root is not None
        snap = self.root / "snapshots" / res.digest.removeprefix("sha256:")
        if verify:
            for f in manifest["files"]:
                self._verified_blob("sha256:" + f["sha256"], res.ref, None, trust_stamp=True)
        if snap.is_dir():
            return snap
        if not self.writable:
            return self._private_snapshot(res.digest, manifest, res.ref)
        with os_errors("creating a snapshot"), self._gc_shared():
            tmp = self.store.staging_dir("snap-")
            self._link_files(manifest, tmp, relative=True)  # relative: a moved registry keeps working snapshots
            snap.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, snap)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not snap.is_dir():
                    raise
        return snap

    def _link_files(self, manifest: dict[str, Any], directory: Path, *, relative: bool) -> None:
        assert isinstance(self.store, LocalStore)
        for f in manifest["files"]:
            dest = directory / _safe_rel(f["path"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob = self.store.blob_path("sha256:" + f["sha256"])
            os.symlink(os.path.relpath(blob, dest.parent) if relative else blob, dest)

    def _private_snapshot(self, digest: str, manifest: dict[str, Any], ref: str) -> Path:
        """A snapshot in the system's temp directory (removed at exit): links into a read-only local
        registry, or the files of a remote one, downloaded and hash-checked."""
        cache = self.__dict__.setdefault("_private_snapshots", {})
        if digest in cache and cache[digest].is_dir():
            return cache[digest]
        with os_errors("creating a snapshot of a read-only registry in the temp directory"):
            parent = Path(tempfile.mkdtemp(prefix="adapterhub-snapshot-"))
            atexit.register(shutil.rmtree, parent, ignore_errors=True)
            snap = parent / digest.removeprefix("sha256:")
            snap.mkdir()
            if isinstance(self.store, LocalStore):
                self._link_files(manifest, snap, relative=False)
            else:
                for f in manifest["files"]:
                    dest = snap / _safe_rel(f["path"])
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self._download("sha256:" + f["sha256"], dest, ref, None)
        cache[digest] = snap
        return snap

    def load(self, ref: str | Ref, *, allow_pickle: bool = False, verify: bool = True) -> Adapter:
        """The Adapter a reference names, its tensors read lazily from the blobs (hash-checked first
        unless ``verify`` is False)."""
        from adapterhub.formats import read_adapter
        from adapterhub.formats._files import links_allowed_into

        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        snap = self.snapshot(res, verify=verify)
        blobs = self.store.blobs if isinstance(self.store, LocalStore) else snap
        with links_allowed_into(blobs):
            adapter = read_adapter(snap, format=manifest["format"], allow_pickle=allow_pickle)
        base = manifest.get("base") or {}
        return adapter.replace(base=BaseModelRef(**{k: base.get(k) for k in ("name_or_path", "revision", "fingerprint",
                                                                                "model_type", "architectures")}),
                               name=adapter.name or res.name)

    def pull_format(self, ref: str | Ref, format: str | None = "auto") -> PullFormat:
        """The format ``pull`` writes for ``format``: None is the stored format; ``"auto"`` keeps a
        PEFT or `adapters`-library version as pushed and writes adapterhub's own format (blends) as PEFT
        wherever PEFT can express it (LoRA, IA3, prefix tuning in PEFT's layout), else as stored, with a
        ``note`` saying what happened."""
        manifest = self.manifest(ref)
        stored = manifest["format"]
        if format is None:
            return PullFormat(stored, stored)
        if format != "auto":
            if format not in PULL_FORMATS:
                raise InvalidReferenceError(f"unknown format {format!r}.\n  fix: choose auto, "
                                            f"{', '.join(PULL_FORMATS)}.")
            return PullFormat(format, stored)
        if stored != "adapterhub":  # what the user pushed (PEFT or the `adapters` library's format) comes back as is
            return PullFormat(stored, stored)
        kind = manifest.get("kind")
        layout = (manifest.get("spec") or {}).get("layout", "peft")
        if kind in ("lora", "ia3") or (kind == "prefix" and layout == "peft"):
            note = None if stored == "peft" else (f"converted from the stored {_FORMAT_NAMES[stored]} format to PEFT "
                                                  f"(--format {stored} writes the stored files)")
            return PullFormat("peft", stored, note)
        why = (f"PEFT has no {kind} adapters" if kind == "bottleneck"
               else f"this prefix is in the `adapters` library's '{layout}' layout, which needs the base model to "
                    "convert (adapterhub convert DIR --format peft --base BASE_DIR)")
        hint = "; --format adapters writes it for the `adapters` library" if stored == "adapterhub" else ""
        return PullFormat(stored, stored, f"{why}: written in the stored {_FORMAT_NAMES[stored]} format{hint}")

    def pull(self, ref: str | Ref, out: str | Path, *, format: str | None = None, overwrite: bool = False,
             link: bool = False, verify: bool = False, progress: Progress | None = None) -> Path:
        """Write the version to ``out``, every file checked against its hash: in its stored format
        (``format=None``), converted to ``format``, or with ``format="auto"`` (the CLI's default) in
        PEFT's format where PEFT can express the adapter (:meth:`pull_format`).

        What is checked how: a blob whose stat stamp (inode, size, mtime, ctime) is unchanged since
        it was last hashed (at its push, an earlier pull or ``verify``) is trusted without being read
        again, as git trusts its index on checkout; any other blob is hashed while it is copied (or
        before it is linked), and a mismatch raises and leaves no output. ``verify`` re-hashes every
        blob whatever its stamp. A copy is in-kernel; ``link`` hard-links the files from the store
        instead (same file system; the files are read-only and shared with the registry: never modify
        them). Stamps describe files of this machine's store only.
        """
        from adapterhub.formats import write_adapter
        from adapterhub.formats._files import atomic_directory, check_directory_target

        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        out = Path(out)
        check_directory_target(out, overwrite=overwrite)  # a refused output costs nothing (no snapshot, no load)
        if format is not None:
            format = self.pull_format(res.ref, format).format
        if format is not None and format != manifest["format"]:
            if verify:
                for f in manifest["files"]:
                    self.check_blob("sha256:" + f["sha256"], res.ref, progress)
            adapter = self.load(res)
            return write_adapter(adapter, out, format=format, overwrite=overwrite)
        if link and not isinstance(self.store, LocalStore):
            raise RegistryError(f"--link needs a registry on this machine; {self.location} is remote.\n"
                                "  fix: pull without --link (or pull --from it into a local registry first).")
        with atomic_directory(out, overwrite=overwrite) as tmp, os_errors(f"writing {out}"):
            for f in manifest["files"]:
                digest = "sha256:" + f["sha256"]
                dest = tmp / _safe_rel(f["path"])
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not isinstance(self.store, LocalStore):  # a remote blob is always hashed on arrival
                    self._download(digest, dest, res.ref, progress)
                elif link:
                    self._link_verified(digest, dest, res.ref, progress, verify)
                elif verify or not self._copy_trusted(digest, dest, progress):
                    self._copy_verified(digest, dest, res.ref, progress)
        return out

    def _link_verified(self, digest: str, dest: Path, ref: str, progress: Progress | None, verify: bool) -> None:
        """Hard-link a blob after checking it. A new link changes the blob's ctime (its link count), so
        its stamp is recorded again when nothing but that changed (same inode, size and mtime)."""
        blob = self._verified_blob(digest, ref, progress, trust_stamp=not verify)
        before = self._stat_stamp(digest)
        os.link(blob, dest)
        after = self._stat_stamp(digest)
        if (before is not None and after is not None and self.index.stamped(digest) == before
                and after.rsplit(":", 1)[0] == before.rsplit(":", 1)[0]):
            self.index.stamp(digest, after)

    def _copy_trusted(self, digest: str, dest: Path, progress: Progress | None) -> bool:
        """Copy a blob (in-kernel) without reading it here if its stat stamp is the one recorded when it
        was last hashed, before and after the copy; False (and nothing trusted) otherwise."""
        stamp = self._stat_stamp(digest)
        if stamp is None or self.index.stamped(digest) != stamp:
            return False
        src = self.store.blob_path(digest)
        shutil.copyfile(src, dest)
        if self._stat_stamp(digest) != stamp:  # changed while being copied: copy it again, hashed
            return False
        if progress:
            progress(int(stamp.split(":")[1]))
        return True

    def _copy_verified(self, digest: str, dest: Path, ref: str, progress: Progress | None) -> None:
        """Copy a blob (in-kernel) while another thread hashes it; a mismatch raises after the copy,
        and the caller's staging directory is then discarded. A match records the blob's stamp."""
        from concurrent.futures import ThreadPoolExecutor

        assert isinstance(self.store, LocalStore)
        src = self.store.blob_path(digest)
        if not src.is_file():
            self._verified_blob(digest, ref, progress)  # raises with the message
        stamp = self._stat_stamp(digest)
        with ThreadPoolExecutor(1) as pool:
            hashed = pool.submit(hash_file, src, progress)
            shutil.copyfile(src, dest)
            actual, _ = hashed.result()
        if actual != digest:
            raise corrupt(digest, actual, src, ref)
        if stamp is not None and self._stat_stamp(digest) == stamp:
            self.index.stamp(digest, stamp)

    # --- gc, verify ----------------------------------------------------------------------------

    def _referenced(self) -> tuple[set[str], int]:
        keep: set[str] = set()
        count = 0
        for name in self.names():
            for v, d in self._versions(name).items():
                count += 1
                keep.add(d)
                try:
                    manifest = self._manifest(d, f"{name}@{v}")
                except IntegrityError as e:
                    raise RegistryError(f"gc refuses to run: the manifest of {name}@{v} cannot be read, so the "
                                        f"files it names are unknown.\n  {e}\n  fix: `adapterhub rm {name}@{v}` "
                                        "(or restore the manifest), then gc again.") from e
                keep.update("sha256:" + f["sha256"] for f in manifest.get("files", []))
        return keep, count

    def gc(self, *, dry_run: bool = False, temp_grace: float = DEFAULT_TEMP_GRACE,
           grace: float | None = None) -> GcPlan | GcResult:
        """Remove unreferenced blobs, snapshots of removed versions and staging leftovers.

        Staging entries whose writer process is gone are removed at once; entries no live process owns
        (left by an older adapterhub) once older than ``temp_grace`` seconds (0: now); entries of
        running writers never. With ``dry_run`` nothing is removed and the :class:`GcPlan` is returned;
        otherwise a :class:`GcResult` says what was really removed (blobs a push referenced meanwhile
        are kept and listed in ``kept``, not counted as freed).

        On a remote store (where no lock keeps gc and pushes apart) only unreferenced blobs older than
        ``grace`` seconds are removed (default :data:`DEFAULT_REMOTE_GRACE`, a day: longer than any push
        takes to create its version ref after uploading), and multipart uploads pending that long are
        aborted. ``grace`` applies to local blobs too when given (default 0 there: pushes hold a lock).

        Raises:
            RegistryError: a manifest cannot be read (the files it names are unknown): ``rm`` it first.
            StorageError: the registry is read-only (``dry_run`` works on one).
        """
        for what, value in (("grace", grace), ("temp_grace", temp_grace)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0):
                raise RegistryError(f"gc's {what} must be a number of seconds, 0 or more, not {value!r}.\n"
                                    f"  fix: pass e.g. --{what.replace('_', '-')} 3600 (inf: never).")
        if not dry_run:
            self._require_writable("collect garbage")
        if grace is None:
            grace = 0.0 if self.store.local else DEFAULT_REMOTE_GRACE
        plan = self._gc_plan(temp_grace, grace)
        return plan if dry_run else plan.execute()

    def _gc_plan(self, temp_grace: float, grace: float = 0.0) -> GcPlan:
        keep, _ = self._referenced()
        plan = GcPlan(self, temp_grace=temp_grace, grace=grace)
        now = time.time()
        for info in self.store.list_blob_info():
            if info.digest not in keep and now - info.mtime >= grace:
                plan.expected_freed_size += info.size
                plan.blobs.append(info.digest)
        if self.root is not None:
            snaps = self.root / "snapshots"
            if snaps.is_dir():
                plan.snapshots = [p for p in sorted(snaps.iterdir()) if f"sha256:{p.name}" not in keep]
        plan.leftovers = self.store.leftovers(temp_grace if self.store.local else grace)
        plan.temp = [item.handle if isinstance(item.handle, Path) else item.where for item in plan.leftovers]
        plan.expected_freed_size += sum(item.size for item in plan.leftovers)
        return plan

    def _gc_execute(self, plan: GcPlan) -> GcResult:
        result = GcResult()
        with self._lock("gc.lock", exclusive=True):
            keep, _ = self._referenced()  # re-check: a push may have referenced a blob since planning
            for digest in plan.blobs:
                if digest in keep:
                    result.kept.append(digest)
                    continue
                size = self.store.blob_size(digest)
                if size is None:  # removed by a concurrent gc
                    continue
                self.store.delete_blob(digest)
                result.blobs.append(digest)
                result.freed_size += size
            for p in plan.snapshots:
                if f"sha256:{p.name}" not in keep and p.exists():
                    shutil.rmtree(p, ignore_errors=True)
                    result.snapshots.append(p)
            grace = plan.temp_grace if self.store.local else plan.grace
            for item, shown in zip(plan.leftovers, plan.temp, strict=True):
                freed = self.store.remove_leftover(item, grace)
                if freed >= 0:
                    result.freed_size += freed
                    result.temp.append(shown)
            if isinstance(self.store, LocalStore):
                self.store.remove_dead_staging()  # the dead writers' lock files (their entries are gone)
        return result

    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Check every manifest parses and every blob hashes right; list orphans and index drift.

        Never writes to the registry beyond the index's hash stamps (and not even those when the
        registry is read-only).
        """
        problems: list[VerifyProblem] = []
        referenced: set[str] = set()
        readable: set[tuple[str, str, str]] = set()
        versions = 0
        for name in self.names():
            for v, d in sorted(self._versions(name).items()):
                versions += 1
                ref = f"{name}@{v}"
                referenced.add(d)
                try:
                    manifest = self._manifest(d, ref)
                except IntegrityError as e:
                    problems.append(VerifyProblem("error", "manifest", ref, str(e)))
                    continue
                readable.add((name, v, d))
                if manifest.get("name") != name or manifest.get("version") != v:
                    problems.append(VerifyProblem("error", "manifest", ref, f"manifest {d} describes "
                                                  f"{manifest.get('name')}@{manifest.get('version')}"))
                for f in manifest.get("files", []):
                    digest = "sha256:" + f["sha256"]
                    referenced.add(digest)
                    try:
                        self.check_blob(digest, ref, progress)
                    except IntegrityError as e:
                        problems.append(VerifyProblem("error", "blob", f"{ref}:{f['path']}", str(e)))
        blobs = 0
        for digest in self.store.list_blobs():
            blobs += 1
            if digest not in referenced:
                problems.append(VerifyProblem("orphan", "blob", self.store.describe(digest),
                                              "referenced by no version; `adapterhub gc` removes it"))
        if not isinstance(self.store, LocalStore):
            for item in self.store.leftovers(0.0):
                problems.append(VerifyProblem("orphan", item.what, item.where, item.why))
        elif self.store.tmp.is_dir():
            for p in sorted(self.store.tmp.iterdir()):
                token, alive = self.store.staging_owner(p)
                if alive:
                    continue  # a running push's staging file: not an orphan
                if alive is False:
                    pid = (token or "w?").split("-")[0][1:]
                    why = f"left by a process that is gone (pid {pid}); the next push or `adapterhub gc` removes it"
                else:
                    why = ("left by an interrupted operation; `adapterhub gc` removes it once an hour old "
                           "(`adapterhub gc --temp-grace 0` now)")
                problems.append(VerifyProblem("orphan", "staging", str(p), why))
        indexed = {(i.name, i.version, i.digest) for i in self.list()}
        if indexed != readable:
            problems.append(VerifyProblem("error", "index", f"{self.location}/index.sqlite",
                                          f"the index disagrees with the refs ({len(indexed ^ readable)} entries); "
                                          "run `adapterhub reindex`"))
        return VerifyReport(tuple(problems), versions, blobs)


def next_version(versions: dict[str, str] | Sequence[str]) -> str:
    """The number a push without a version gets: one more than the largest integer version."""
    return str(max((int(v) for v in versions if is_integer_version(v)), default=0) + 1)


def _version_key(v: str) -> tuple:
    return (0, int(v), "") if is_integer_version(v) else (1, 0, v)


def _same_content(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return all(old.get(k) == new.get(k) for k in ("kind", "format", "files"))


def _spec_dict(adapter: Adapter) -> dict[str, Any]:
    from adapterhub.formats.native import spec_to_dict

    return spec_to_dict(adapter.spec)


def _safe_rel(rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise IntegrityError(f"a manifest names file {rel!r} outside the version's directory; refusing it.\n"
                             "  fix: `adapterhub verify` names the version; `adapterhub rm NAME@VERSION` removes it.")
    return p
