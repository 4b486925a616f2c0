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
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapterhub.adapter import Adapter, BaseModelRef
from adapterhub.errors import (
    IntegrityError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
    VersionExistsError,
)
from adapterhub.registry.index import Index, VersionInfo, row_from_manifest
from adapterhub.registry.refs import (
    LATEST,
    Ref,
    check_label,
    check_name,
    check_target,
    is_integer_version,
    parse_ref,
)
from adapterhub.registry.store import LocalStore, corrupt, hash_file, os_errors

FORMAT_NAME = "adapterhub-registry"
FORMAT_VERSION = 1
MANIFEST_SCHEMA = "adapterhub.manifest.v1"
ENV_VAR = "ADAPTERHUB_REGISTRY"
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
    """What a push did: ``created`` is False when an identical version already existed."""

    name: str
    version: str
    digest: str
    created: bool
    manifest: dict[str, Any]

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


@dataclass
class GcPlan:
    """What ``gc`` would remove; :meth:`execute` removes it (under the registry's exclusive lock)."""

    registry: Registry
    blobs: list[str] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)
    temp: list[Path] = field(default_factory=list)
    expected_freed_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"blobs": self.blobs, "snapshots": [str(p) for p in self.snapshots], "temp": [str(p) for p in self.temp],
                "expected_freed_size": self.expected_freed_size}

    def execute(self) -> int:
        """Remove what the plan lists (re-checked under the lock); returns bytes freed."""
        return self.registry._gc_execute(self)


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

    # --- layout, locks, index ------------------------------------------------------------------

    def _init_layout(self) -> None:
        marker = self.root / "registry.json"
        with os_errors(f"creating the registry at {self.root}"):
            if marker.is_file():
                try:
                    doc = json.loads(marker.read_text())
                except json.JSONDecodeError as e:
                    raise RegistryError(f"{marker} is damaged ({e}).\n  fix: restore it: "
                                        f'{{"format": "{FORMAT_NAME}", "version": {FORMAT_VERSION}}}') from e
                if doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
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

    @contextmanager
    def _lock(self, rel: str, exclusive: bool = True) -> Iterator[None]:
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
        # one process at a time creates the file, switches it to WAL and rebuilds it: concurrent
        # first opens otherwise fail with "database is locked" on the journal-mode switch
        with self._lock("index.lock"):
            index = Index(self.root / "index.sqlite")
            if index.needs_rebuild:
                self._rebuild(index)
        return index

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
        """Rebuild the search index from refs and manifests (the source of truth)."""
        if self._index is None:
            self._index = self._open_index()
        with self._lock("index.lock"):
            self._rebuild(self._index)

    def _rebuild(self, idx: Index) -> None:
        def load(name: str) -> tuple[list[tuple], dict[str, str]]:
            versions = self._versions(name)
            rows = [row_from_manifest(name, v, d, self._manifest(d, f"{name}@{v}")) for v, d in versions.items()]
            return rows, self._tags(name, versions)

        idx.rebuild(self.names(), load)

    def _refresh(self, name: str) -> None:
        """Re-index one name from its refs (caller holds the name's lock)."""
        idx = self._index
        assert idx is not None
        versions = self._versions(name)
        known = idx.known(name)
        keep = {v for v, d in versions.items() if known.get(v) == d}
        rows = [row_from_manifest(name, v, d, self._manifest(d, f"{name}@{v}"))
                for v, d in versions.items() if v not in keep]
        rows.sort(key=lambda r: (r[7] or "", r[1]))
        idx.replace_name(name, rows, self._tags(name, versions), keep)

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
        return max(versions, key=lambda v: (self._manifest(versions[v]).get("created_at") or "", v))

    def _tags(self, name: str, versions: dict[str, str]) -> dict[str, str]:
        tags = {t: v for t, v in self._explicit_tags(name).items() if v in versions}
        if LATEST not in tags and (newest := self._newest(name, versions)):
            tags[LATEST] = newest
        return tags

    def _manifest(self, digest: str, ref: str | None = None) -> dict[str, Any]:
        path = self.store.blob_path(digest)
        try:
            data = self.store.get_bytes(digest)
        except IntegrityError as e:
            raise corrupt(digest, e.actual or "?", path, ref) from e
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise IntegrityError(f"manifest {digest} of '{ref}' is not valid JSON.", path=path) from e

    # --- resolve, show, list -------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> Resolved:
        """The version a reference names.

        Raises:
            InvalidReferenceError: malformed reference.
            NotFoundError: no such name, version, tag or digest.
        """
        r = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self._versions(r.name)
        if not versions:
            raise NotFoundError(f"no adapter named '{r.name}' in {self.root}.\n  fix: `adapterhub list` shows "
                                "what is there; `adapterhub push DIR NAME` adds one.", ref=str(r))
        if r.digest:
            for v, d in versions.items():
                if d == r.digest:
                    return Resolved(r.name, v, d)
            raise NotFoundError(f"no version of '{r.name}' has manifest digest {r.digest}.", ref=str(r))
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
        """Manifest plus where it lives: digest and the tags that point at it now."""
        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        tags = sorted(t for t, v in self._tags(res.name, self._versions(res.name)).items() if v == res.version)
        return {"ref": res.ref, "digest": res.digest, "current_tags": tags, "manifest": manifest}

    def list(self, pattern: str | None = None, *, kind: str | None = None, base: str | None = None,
             tag: str | None = None) -> list[VersionInfo]:
        """Versions matching a name glob (``team/*``), kind, base (name glob or fingerprint prefix) and tag."""
        return self.index.query(pattern=pattern, kind=kind, base=base, tag=tag)

    # --- push ----------------------------------------------------------------------------------

    def push(self, source: str | Path | Adapter, target: str, *, tags: Sequence[str] = (), description: str = "",
             metrics: dict[str, Any] | None = None, base: str | Path | None = None,
             parents: Sequence[dict[str, Any]] = (), recipe: dict[str, Any] | None = None,
             allow_pickle: bool = False, progress: Progress | None = None) -> PushResult:
        """Store an adapter directory (any readable format) or Adapter as ``NAME[@VERSION]``.

        Without a version the next integer is used. With ``base``, the compatibility check runs
        first and an incompatible adapter is refused; the base's fingerprint is recorded.

        Raises:
            InvalidReferenceError: bad name, version or tag (before anything is written).
            VersionExistsError: the version exists with other content.
            CompatibilityError: the adapter does not fit ``base``.
            StorageError: disk full or permission denied (nothing half-written is visible).
        """
        name, version = check_target(target)
        for t in tags:
            self._check_tag(t)
        from adapterhub.formats import detect, read_adapter, write_adapter

        with self._gc_shared():
            staging = None
            try:
                if isinstance(source, Adapter):
                    staging = Path(self._mkdtemp("push-"))
                    write_adapter(source, staging / "adapter", format="adapterhub")
                    src_dir, fmt, adapter = staging / "adapter", "adapterhub", source
                else:
                    src_dir = Path(source)
                    fmt = detect(src_dir)
                    adapter = read_adapter(src_dir, format=fmt, allow_pickle=allow_pickle)
                base_ref = adapter.base
                if base is not None:
                    from adapterhub.base import BaseCheckpoint
                    from adapterhub.compose.checks import check_adapter

                    ckpt = BaseCheckpoint.open(base)
                    check_adapter(adapter, ckpt, subject=str(source)).raise_for_errors()
                    base_ref = BaseModelRef(name_or_path=base_ref.name_or_path or ckpt.name_or_path,
                                            revision=base_ref.revision, fingerprint=ckpt.fingerprint())
                files = self._store_files(src_dir, progress)
                content = {
                    "kind": adapter.kind, "format": fmt, "files": files,
                    "spec": _spec_dict(adapter), "base": asdict(base_ref),
                }
                return self._commit(name, version, content, adapter, tags=list(tags),
                                    description=description, metrics=metrics or {}, parents=list(parents),
                                    recipe=recipe)
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)

    def _mkdtemp(self, prefix: str) -> str:
        import tempfile

        self.store.tmp.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=self.store.tmp)

    def _store_files(self, src_dir: Path, progress: Progress | None) -> list[dict[str, Any]]:
        files = []
        for path in sorted(_walk(src_dir)):
            rel = path.relative_to(src_dir).as_posix()
            digest, size, created = self.store.put_file(path, progress)
            if created:  # hashed while writing it: its content is known to match
                self._stamp(digest)
            files.append({"path": rel, "sha256": digest.removeprefix("sha256:"), "size": size})
        if not files:
            raise RegistryError(f"{src_dir} has no files to push.")
        return files

    def _check_tag(self, tag: str) -> str:
        check_label(tag, "tag")
        if tag.startswith("sha256"):
            raise InvalidReferenceError(f"tag '{tag}' would read as a digest.", ref=tag)
        if is_integer_version(tag):
            raise InvalidReferenceError(f"tag '{tag}' is a number; numbers are reserved for versions.", ref=tag)
        return tag

    def _commit(self, name: str, version: str | None, content: dict[str, Any], adapter: Adapter, *,
                tags: list[str], description: str, metrics: dict[str, Any], parents: list[dict[str, Any]],
                recipe: dict[str, Any] | None) -> PushResult:
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
        """Point ``tag`` at the version ``ref`` names (moving it if it exists)."""
        self._check_tag(tag)
        res = self.resolve(ref)
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
        """Remove one version and the tags pointing at it; its blobs go at the next ``gc``."""
        r = parse_ref(ref)
        if r.label is None and r.digest is None:
            raise InvalidReferenceError(f"say which version of '{r.name}' to remove: {r.name}@VERSION.", ref=ref)
        res = self.resolve(r)
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
        """A directory holding the version's files (symlinks into the blob store), hash-checked."""
        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        snap = self.root / "snapshots" / res.digest.removeprefix("sha256:")
        if verify:
            for f in manifest["files"]:
                self._verified_blob("sha256:" + f["sha256"], res.ref, None, trust_stamp=True)
        if snap.is_dir():
            return snap
        with os_errors("creating a snapshot"), self._gc_shared():
            tmp = Path(self._mkdtemp("snap-"))
            for f in manifest["files"]:
                dest = tmp / _safe_rel(f["path"])
                dest.parent.mkdir(parents=True, exist_ok=True)
                # relative, so a copied or moved registry keeps working snapshots
                os.symlink(os.path.relpath(self.store.blob_path("sha256:" + f["sha256"]), dest.parent), dest)
            snap.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, snap)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not snap.is_dir():
                    raise
        return snap

    def load(self, ref: str | Ref, *, allow_pickle: bool = False) -> Adapter:
        """The Adapter a reference names, its tensors read lazily from the verified blobs."""
        from adapterhub.formats import read_adapter

        res = self.resolve(ref)
        manifest = self._manifest(res.digest, res.ref)
        adapter = read_adapter(self.snapshot(res), format=manifest["format"], allow_pickle=allow_pickle)
        base = manifest.get("base") or {}
        return adapter.replace(base=BaseModelRef(**{k: base.get(k) for k in ("name_or_path", "revision",
                                                                                "fingerprint")}),
                               name=adapter.name or res.name)

    def pull(self, ref: str | Ref, out: str | Path, *, format: str | None = None, overwrite: bool = False,
             link: bool = False, progress: Progress | None = None) -> Path:
        """Write the version to ``out`` in its stored format (or converted to ``format``), every hash checked.

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
                except (IntegrityError, NotFoundError) as e:
                    raise RegistryError(f"gc refuses to run: the manifest of {name}@{v} cannot be read, so the "
                                        f"files it names are unknown.\n  {e}\n  fix: `adapterhub rm {name}@{v}` "
                                        "(or restore the manifest), then gc again.") from e
                keep.update("sha256:" + f["sha256"] for f in manifest.get("files", []))
        return keep, count

    def gc(self, *, dry_run: bool = False, temp_grace: float = 3600.0) -> GcPlan:
        """Plan (and unless ``dry_run``, do) removal of unreferenced blobs, stale snapshots and staging
        leftovers older than ``temp_grace`` seconds."""
        plan = self._gc_plan(temp_grace)
        if not dry_run:
            plan.execute()
        return plan

    def _gc_plan(self, temp_grace: float) -> GcPlan:
        import time

        keep, _ = self._referenced()
        plan = GcPlan(self)
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
                try:
                    if now - p.lstat().st_mtime >= temp_grace:
                        plan.temp.append(p)
                except FileNotFoundError:
                    continue
        return plan

    def _gc_execute(self, plan: GcPlan) -> int:
        freed = 0
        with self._lock("gc.lock", exclusive=True):
            keep, _ = self._referenced()  # re-check: a push may have referenced a blob since planning
            for digest in plan.blobs:
                if digest in keep:
                    continue
                path = self.store.blob_path(digest)
                try:
                    freed += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
            for p in plan.snapshots:
                if f"sha256:{p.name}" not in keep:
                    shutil.rmtree(p, ignore_errors=True)
            for p in plan.temp:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        return freed

    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Check every manifest parses and every blob hashes right; list orphans and index drift."""
        problems: list[VerifyProblem] = []
        referenced: set[str] = set()
        versions = 0
        for name in self.names():
            for v, d in sorted(self._versions(name).items()):
                versions += 1
                ref = f"{name}@{v}"
                referenced.add(d)
                try:
                    manifest = self._manifest(d, ref)
                except (IntegrityError, NotFoundError) as e:
                    problems.append(VerifyProblem("error", "manifest", ref, str(e)))
                    continue
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
                problems.append(VerifyProblem(
                    "orphan", "staging", str(p),
                    "left by an interrupted operation; `adapterhub gc` removes it once an hour old"))
        indexed = {(i.name, i.version, i.digest) for i in self.list()}
        actual = {(n, v, d) for n in self.names() for v, d in self._versions(n).items()}
        if indexed != actual:
            problems.append(VerifyProblem("error", "index", str(self.root / "index.sqlite"),
                                          f"the index disagrees with the refs ({len(indexed ^ actual)} entries); "
                                          "run `adapterhub reindex`"))
        return VerifyReport(tuple(problems), versions, blobs)


def _version_key(v: str) -> tuple:
    return (0, int(v), "") if is_integer_version(v) else (1, 0, v)


def _same_content(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return all(old.get(k) == new.get(k) for k in ("kind", "format", "files"))


def _spec_dict(adapter: Adapter) -> dict[str, Any]:
    from adapterhub.formats.native import spec_to_dict

    return spec_to_dict(adapter.spec)


def _walk(root: Path) -> Iterator[Path]:
    """Regular files below ``root`` (symlinks followed to files), hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                p = Path(dirpath) / f
                if p.is_file():
                    yield p


def _safe_rel(rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise IntegrityError(f"a manifest names file {rel!r} outside the version's directory; refusing it.")
    return p

