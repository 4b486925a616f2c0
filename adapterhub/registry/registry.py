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
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from adapterhub.registry.store import LocalStore, corrupt, entry_size, hash_file, os_errors, remove_entry

FORMAT_NAME = "adapterhub-registry"
FORMAT_VERSION = 1
MANIFEST_SCHEMA = "adapterhub.manifest.v1"
ENV_VAR = "ADAPTERHUB_REGISTRY"
#: staging entries no live process owns (written by an older adapterhub) wait this long for gc
DEFAULT_TEMP_GRACE = 3600.0
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
    temp: list[Path] = field(default_factory=list)
    expected_freed_size: int = 0
    temp_grace: float = DEFAULT_TEMP_GRACE

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
    temp: list[Path] = field(default_factory=list)
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

    Safe for concurrent use by many processes on one machine (POSIX file locks).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.root = (Path(path).expanduser() if path is not None else default_path()).absolute()
        self.store = LocalStore(self.root)
        self._index: Index | None = None
        self._init_layout()
        self.writable = _writable(self.root)

    # --- layout, locks, index ------------------------------------------------------------------

    def _init_layout(self) -> None:
        marker = self.root / "registry.json"
        with os_errors(f"creating the registry at {self.root}"):
            if marker.is_file():
                try:
                    doc = _json.loads(marker.read_bytes())
                except (ValueError, UnicodeDecodeError) as e:
                    raise RegistryError(f"{marker} is damaged ({e}).\n  fix: restore it: "
                                        f'{{"format": "{FORMAT_NAME}", "version": {FORMAT_VERSION}}}') from e
                if not isinstance(doc, dict) or (doc.get("format"), doc.get("version")) != (FORMAT_NAME,
                                                                                           FORMAT_VERSION):
                    raise RegistryError(f"{self.root} is a registry of format {doc!r}; this adapterhub reads "
                                        f"{FORMAT_NAME} v{FORMAT_VERSION}.")
                return
            layout = ("blobs", "refs", "locks", "tmp", "snapshots", "index.sqlite", "registry.json")
            if self.root.exists() and any(p.name not in layout and not p.name.startswith("index.sqlite")
                                          for p in self.root.iterdir()):
                raise RegistryError(f"{self.root} exists, is not empty and is not an adapterhub registry.\n"
                                    "  fix: choose another --registry path.")
            for sub in ("blobs/sha256", "refs", "locks", "tmp", "snapshots"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            marker_text = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION}) + "\n"
            self.store.create_doc("registry.json", marker_text)  # atomic: a concurrent creator may win

    def _require_writable(self, what: str) -> None:
        """Refuse a write command on a registry this process cannot write, before touching anything."""
        if not self.writable:
            raise StorageError(
                f"cannot {what}: the registry at {self.root} is read-only.\n  fix: use a registry you can write "
                "to (--registry PATH or $ADAPTERHUB_REGISTRY), or ask its owner to make it writable; reading "
                "(list, show, verify, pull) works as is.")

    @contextmanager
    def _lock(self, rel: str, exclusive: bool = True) -> Iterator[None]:
        if not self.writable:  # nobody can change a read-only registry: nothing to coordinate
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

    def _name_lock(self, name: str):  # noqa: ANN202
        return self._lock(f"names/{self._name_dir(name)}.lock")

    def _gc_shared(self):  # noqa: ANN202
        return self._lock("gc.lock", exclusive=False)

    def _open_index(self) -> Index:
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
        for name in self._index.dirty_names():
            with self._name_lock(name):
                self._refresh(name)
        return self._index

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
                    state = ("missing" if not self.store.blob_path(d).exists() else
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
        return self.index.damaged()

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
        refs = self.root / "refs"
        if not refs.is_dir():
            return out
        for ns in sorted(refs.iterdir()):
            for short in sorted(ns.iterdir()) if ns.is_dir() else ():
                if (short / "versions").is_dir() and any(short.joinpath("versions").iterdir()):
                    out.append(short.name if ns.name == "_" else f"{ns.name}/{short.name}")
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
        path = self.store.blob_path(digest)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise IntegrityError(f"the manifest{of} is missing (blob {digest}).\n  file: {path}\n{fix}",
                                 path=path, expected=digest) from e
        except OSError as e:
            raise IntegrityError(f"the manifest{of} cannot be read ({e.strerror}).\n  file: {path}\n{fix}",
                                 path=path, expected=digest) from e
        actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if actual != digest:
            raise IntegrityError(f"the manifest{of} is corrupt (sha256 mismatch).\n  file: {path}\n"
                                 f"  expected: {digest}\n  actual:   {actual}\n{fix}",
                                 path=path, expected=digest, actual=actual)
        try:
            manifest = _json.loads(data)
        except ValueError as e:
            raise IntegrityError(f"the manifest{of} ({digest}) is not valid JSON ({e}).\n  file: {path}\n{fix}",
                                 path=path, expected=digest) from e
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not (isinstance(files, list) and all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                                and isinstance(f.get("sha256"), str) for f in files)):
            raise IntegrityError(f"the manifest{of} ({digest}) is not an adapterhub manifest.\n  file: {path}\n{fix}",
                                 path=path, expected=digest)
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
            raise NotFoundError(f"no adapter named '{r.name}' in {self.root}.\n  fix: `adapterhub list` shows "
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
                            f"{', '.join(sorted(versions, key=_version_key))}; tags: {', '.join(sorted(tags))}).",
                            ref=str(r))

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
        return self.index.query(pattern=pattern, kind=kind, base=base, tag=tag)

    # --- push ----------------------------------------------------------------------------------

    def push(self, source: str | Path | Adapter, target: str, *, tags: Sequence[str] = (), description: str = "",
             metrics: dict[str, Any] | None = None, base: str | Path | None = None,
             parents: Sequence[dict[str, Any]] = (), recipe: dict[str, Any] | None = None,
             allow_pickle: bool = False, include: Sequence[str] = (), include_all: bool = False,
             allow_duplicate: bool = False, progress: Progress | None = None) -> PushResult:
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
            self.store.remove_dead_staging()
            staging = None
            try:
                if isinstance(source, Adapter):
                    staging = self.store.staging_dir("push-")
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
                if base is not None:
                    from adapterhub.base import BaseCheckpoint
                    from adapterhub.compose.checks import check_adapter

                    ckpt = BaseCheckpoint.open(base)
                    check_adapter(adapter, ckpt, subject=str(source), scan_values=False).raise_for_errors()
                    base_ref = ckpt.identity(base_ref)
                files, repaired = self._store_files(src_dir, selection.files, progress)
                content = {
                    "kind": adapter.kind, "format": fmt, "files": files,
                    "spec": _spec_dict(adapter), "base": json.loads(json.dumps(asdict(base_ref))),
                }
                result = self._commit(name, version, content, adapter, tags=list(tags),
                                      description=description, metrics=metrics or {}, parents=list(parents),
                                      recipe=recipe, allow_duplicate=allow_duplicate)
                return replace(result, left_out=selection.left_out, repaired=tuple(repaired))
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)

    def _blob_trusted(self, digest: str) -> bool:
        """An existing blob may be used as is when its stat stamp equals the one recorded when it was
        last hashed (any write, chmod or replacement changes the stamp)."""
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
            raise RegistryError(f"{src_dir} has no files to push.")
        return files, repaired

    def _commit(self, name: str, version: str | None, content: dict[str, Any], adapter: Adapter, *,
                tags: list[str], description: str, metrics: dict[str, Any], parents: list[dict[str, Any]],
                recipe: dict[str, Any] | None, allow_duplicate: bool = False) -> PushResult:
        index = self.index
        with self._name_lock(name):
            versions = self._versions(name)
            explicit_tags = self._explicit_tags(name)
            if version is not None and version in versions:
                old = self._manifest(versions[version], f"{name}@{version}")
                if _same_content(old, content):
                    return PushResult(name, version, versions[version], False, old)
                raise VersionExistsError(
                    f"{name}@{version} already exists with different content; versions are immutable.\n"
                    f"  fix: push without @VERSION to get the next number, or choose a new version.",
                    ref=f"{name}@{version}")
            if not allow_duplicate:
                for v, d in index.same_content(name, content_key(content)):
                    if versions.get(v) == d:
                        try:
                            old = self._manifest(d, f"{name}@{v}")
                        except IntegrityError:
                            continue
                        return PushResult(name, v, d, False, old, duplicate=True)
            if version is None:
                version = str(max((int(v) for v in versions if is_integer_version(v)), default=0) + 1)
            clash = [t for t in tags if t in versions] + ([version] if version in explicit_tags else [])
            if clash:
                raise InvalidReferenceError(f"'{clash[0]}' is already used by '{name}' as a "
                                            f"{'version' if clash[0] in versions else 'tag'}; tags and versions "
                                            "share one namespace per name.", ref=f"{name}@{clash[0]}")
            manifest = {
                "schema": MANIFEST_SCHEMA, "name": name, "version": version, **content,
                "created_at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "description": description, "tags": sorted(set(tags)), "metrics": metrics,
                "parents": parents, "recipe": recipe,
                "size": sum(f["size"] for f in content["files"]), "num_parameters": adapter.num_parameters,
            }
            digest = self.store.put_bytes(canonical_json(manifest))
            index.mark_dirty(name)
            # newest first: if the ref is never created, _newest() falls back to creation times
            self.store.replace_doc(self._key(name, "newest"), version + "\n")
            if not self.store.create_doc(self._key(name, "versions", version), digest + "\n"):
                raise VersionExistsError(f"{name}@{version} was created concurrently.", ref=f"{name}@{version}")
            for t in tags:
                self.store.replace_doc(self._key(name, "tags", t), version + "\n")
            self._refresh(name)
            return PushResult(name, version, digest, True, manifest)

    # --- tags, rm ------------------------------------------------------------------------------

    def tag(self, ref: str, tag: str) -> Resolved:
        """Point ``tag`` at the version ``ref`` names (moving it if it exists).

        Tags that read as numbers (``1``, ``01``, ``1.0``, ``1e3``, ``inf``, ``nan``), booleans or
        digests are refused: numbers are versions, and the others change meaning in YAML/JSON tools.
        """
        check_tag(tag)
        res = self.resolve(ref)
        self._require_writable("tag")
        index = self.index  # refreshes dirty names, which takes name locks: before taking ours
        with self._gc_shared(), self._name_lock(res.name):
            versions = self._versions(res.name)
            if tag in versions:
                raise InvalidReferenceError(f"'{tag}' is a version of '{res.name}', it cannot be a tag.", ref=tag)
            if res.version not in versions:
                raise NotFoundError(f"{res.ref} was removed meanwhile.", ref=res.ref)
            index.mark_dirty(res.name)
            self.store.replace_doc(self._key(res.name, "tags", tag), res.version + "\n")
            self._refresh(res.name)
        return res

    def untag(self, name: str, tag: str) -> None:
        """Remove a tag (``latest`` then follows the newest push again)."""
        check_name(name)
        check_label(tag, "tag")
        self._require_writable("untag")
        index = self.index
        with self._gc_shared(), self._name_lock(name):
            if tag not in self._explicit_tags(name):
                if tag == LATEST:
                    raise NotFoundError(f"'{name}@latest' is not pinned; it already follows the newest push.",
                                        ref=f"{name}@{tag}")
                raise NotFoundError(f"'{name}' has no tag '{tag}'.", ref=f"{name}@{tag}")
            index.mark_dirty(name)
            self.store.delete_doc(self._key(name, "tags", tag))
            self._refresh(name)

    def rm(self, ref: str) -> Resolved:
        """Remove one version and the tags pointing at it; its blobs go at the next ``gc``.

        Works on a damaged version too (its manifest is not read): this is how one is removed.
        """
        r = parse_ref(ref)
        if r.label is None and r.digest is None:
            raise InvalidReferenceError(f"say which version of '{r.name}' to remove: {r.name}@VERSION.", ref=ref)
        res = self.resolve(r)
        if r.label is not None and r.label != res.version:  # a tag: removing what it points at is rarely meant
            raise InvalidReferenceError(
                f"'{ref}' is a tag (it points at {res.ref}); rm takes a version.\n"
                f"  fix: `adapterhub untag {res.name} {r.label}` removes the tag; `adapterhub rm {res.ref}` removes "
                "the version.", ref=ref)
        self._require_writable("remove a version")
        index = self.index
        with self._gc_shared(), self._name_lock(res.name):
            index.mark_dirty(res.name)
            for t, v in self._explicit_tags(res.name).items():
                if v == res.version:
                    self.store.delete_doc(self._key(res.name, "tags", t))
            self.store.delete_doc(self._key(res.name, "versions", res.version))
            versions = self._versions(res.name)
            if versions:
                newest = self._newest(res.name, versions)
                self.store.replace_doc(self._key(res.name, "newest"), f"{newest}\n")
            else:
                self.store.delete_doc(self._key(res.name, "newest"))
            self._refresh(res.name)
        return res

    # --- pull, load ----------------------------------------------------------------------------

    def _stat_stamp(self, digest: str) -> str | None:
        try:
            st = self.store.blob_path(digest).stat()
        except FileNotFoundError:
            return None
        # any write or chmod changes ctime; a replaced file changes the inode
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def _stamp(self, digest: str) -> None:
        stamp = self._stat_stamp(digest)
        if stamp is not None:
            self.index.stamp(digest, stamp)

    def _verified_blob(self, digest: str, ref: str, progress: Progress | None, *, trust_stamp: bool = False) -> Path:
        """The blob's path after checking its sha256. With ``trust_stamp``, a blob whose inode, size,
        mtime and ctime are unchanged since it was last hashed is not hashed again."""
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

    def snapshot(self, ref: str | Ref, *, verify: bool = True) -> Path:
        """A directory holding the version's files (symlinks into the blob store), hash-checked.

        A read-only registry gets a private snapshot in the system's temp directory instead (removed
        when the process exits).
        """
        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        snap = self.root / "snapshots" / res.digest.removeprefix("sha256:")
        if verify:
            for f in manifest["files"]:
                self._verified_blob("sha256:" + f["sha256"], res.ref, None, trust_stamp=True)
        if snap.is_dir():
            return snap
        if not self.writable:
            return self._private_snapshot(res.digest, manifest)
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
        for f in manifest["files"]:
            dest = directory / _safe_rel(f["path"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob = self.store.blob_path("sha256:" + f["sha256"])
            os.symlink(os.path.relpath(blob, dest.parent) if relative else blob, dest)

    def _private_snapshot(self, digest: str, manifest: dict[str, Any]) -> Path:
        cache = self.__dict__.setdefault("_private_snapshots", {})
        if digest in cache and cache[digest].is_dir():
            return cache[digest]
        with os_errors("creating a snapshot of a read-only registry in the temp directory"):
            parent = Path(tempfile.mkdtemp(prefix="adapterhub-snapshot-"))
            atexit.register(shutil.rmtree, parent, ignore_errors=True)
            snap = parent / digest.removeprefix("sha256:")
            snap.mkdir()
            self._link_files(manifest, snap, relative=False)
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
        with links_allowed_into(self.store.blobs):
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
                raise InvalidReferenceError(f"unknown format {format!r}; choose auto, {', '.join(PULL_FORMATS)}.")
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
             link: bool = False, progress: Progress | None = None) -> Path:
        """Write the version to ``out``, every hash checked: in its stored format (``format=None``),
        converted to ``format``, or with ``format="auto"`` (the CLI's default) in PEFT's format where
        PEFT can express the adapter (:meth:`pull_format`).

        A copy re-hashes every file while copying it. ``link`` hard-links the files from the store
        instead (same file system; the files are read-only and shared with the registry: never modify
        them) and re-hashes only blobs whose inode, size, mtime or ctime changed since they were last
        hashed (at push or by ``verify``), so it is O(1) in the file size; ``verify`` re-hashes all.
        """
        from adapterhub.formats import write_adapter
        from adapterhub.formats._files import atomic_directory

        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        out = Path(out)
        if format is not None:
            format = self.pull_format(res.ref, format).format
        if format is not None and format != manifest["format"]:
            adapter = self.load(res)
            return write_adapter(adapter, out, format=format, overwrite=overwrite)
        with atomic_directory(out, overwrite=overwrite) as tmp, os_errors(f"writing {out}"):
            for f in manifest["files"]:
                digest = "sha256:" + f["sha256"]
                dest = tmp / _safe_rel(f["path"])
                dest.parent.mkdir(parents=True, exist_ok=True)
                if link:
                    os.link(self._verified_blob(digest, res.ref, progress, trust_stamp=True), dest)
                else:
                    self._copy_verified(digest, dest, res.ref, progress)
        return out

    def _copy_verified(self, digest: str, dest: Path, ref: str, progress: Progress | None) -> None:
        """Copy a blob (in-kernel) while another thread hashes it; a mismatch raises after the copy,
        and the caller's staging directory is then discarded."""
        from concurrent.futures import ThreadPoolExecutor

        src = self.store.blob_path(digest)
        if not src.is_file():
            self._verified_blob(digest, ref, progress)  # raises with the message
        with ThreadPoolExecutor(1) as pool:
            hashed = pool.submit(hash_file, src, progress)
            shutil.copyfile(src, dest)
            actual, _ = hashed.result()
        if actual != digest:
            raise corrupt(digest, actual, src, ref)

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

    def gc(self, *, dry_run: bool = False, temp_grace: float = DEFAULT_TEMP_GRACE) -> GcPlan | GcResult:
        """Remove unreferenced blobs, snapshots of removed versions and staging leftovers.

        Staging entries whose writer process is gone are removed at once; entries no live process owns
        (left by an older adapterhub) once older than ``temp_grace`` seconds (0: now); entries of
        running writers never. With ``dry_run`` nothing is removed and the :class:`GcPlan` is returned;
        otherwise a :class:`GcResult` says what was really removed (blobs a push referenced meanwhile
        are kept and listed in ``kept``, not counted as freed).

        Raises:
            RegistryError: a manifest cannot be read (the files it names are unknown): ``rm`` it first.
            StorageError: the registry is read-only (``dry_run`` works on one).
        """
        if not dry_run:
            self._require_writable("collect garbage")
        plan = self._gc_plan(temp_grace)
        return plan if dry_run else plan.execute()

    def _gc_plan(self, temp_grace: float) -> GcPlan:
        keep, _ = self._referenced()
        plan = GcPlan(self, temp_grace=temp_grace)
        for digest in self.store.list_blobs():
            if digest not in keep:
                try:
                    plan.expected_freed_size += self.store.blob_path(digest).stat().st_size
                except FileNotFoundError:  # removed by a concurrent gc
                    continue
                plan.blobs.append(digest)
        snaps = self.root / "snapshots"
        if snaps.is_dir():
            plan.snapshots = [p for p in sorted(snaps.iterdir()) if f"sha256:{p.name}" not in keep]
        if self.store.tmp.is_dir():
            now = time.time()
            for p in sorted(self.store.tmp.iterdir()):
                if self._staging_removable(p, now, temp_grace):
                    plan.temp.append(p)
                    plan.expected_freed_size += entry_size(p)
        return plan

    def _staging_removable(self, entry: Path, now: float, temp_grace: float) -> bool:
        _, alive = self.store.staging_owner(entry)
        if alive is not None:
            return not alive
        try:
            return now - entry.lstat().st_mtime >= temp_grace
        except FileNotFoundError:
            return False

    def _gc_execute(self, plan: GcPlan) -> GcResult:
        result = GcResult()
        with self._lock("gc.lock", exclusive=True):
            keep, _ = self._referenced()  # re-check: a push may have referenced a blob since planning
            for digest in plan.blobs:
                if digest in keep:
                    result.kept.append(digest)
                    continue
                path = self.store.blob_path(digest)
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:  # removed by a concurrent gc
                    continue
                result.blobs.append(digest)
                result.freed_size += size
            for p in plan.snapshots:
                if f"sha256:{p.name}" not in keep and p.exists():
                    shutil.rmtree(p, ignore_errors=True)
                    result.snapshots.append(p)
            now = time.time()
            for p in plan.temp:
                if p.exists() or p.is_symlink():
                    if self._staging_removable(p, now, plan.temp_grace):
                        result.freed_size += remove_entry(p)
                        result.temp.append(p)
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
                        self._verified_blob(digest, ref, progress)
                    except IntegrityError as e:
                        problems.append(VerifyProblem("error", "blob", f"{ref}:{f['path']}", str(e)))
        blobs = 0
        for digest in self.store.list_blobs():
            blobs += 1
            if digest not in referenced:
                problems.append(VerifyProblem("orphan", "blob", str(self.store.blob_path(digest)),
                                              "referenced by no version; `adapterhub gc` removes it"))
        if self.store.tmp.is_dir():
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
            problems.append(VerifyProblem("error", "index", str(self.root / "index.sqlite"),
                                          f"the index disagrees with the refs ({len(indexed ^ readable)} entries); "
                                          "run `adapterhub reindex`"))
        return VerifyReport(tuple(problems), versions, blobs)


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
        raise IntegrityError(f"a manifest names file {rel!r} outside the version's directory; refusing it.")
    return p



def _writable(root: Path) -> bool:
    """Whether this process may change the registry: its directory and ``locks/`` accept new entries
    (False on a read-only mount, an immutable directory, or without write permission)."""
    locks = root / "locks"
    return os.access(root, os.W_OK | os.X_OK) and (not locks.exists() or os.access(locks, os.W_OK | os.X_OK))
