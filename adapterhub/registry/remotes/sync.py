"""Copy versions between two registries on any stores, keeping their numbers and digests.

For each version: the manifest is read and hash-checked at the source; the blobs the destination
lacks (manifest and files, found by content address) are sent, several at once, each hashed on
arrival (a local destination hashes what it writes; an S3 destination's server checks the sha256 of
each single PUT, and a multipart upload is completed only when the sha256 of the bytes sent matches);
then the version ref is created last, with create-if-absent. A ref that already holds the same
digest is a success (a re-run, or a retry after a lost answer); one holding another digest is a
:class:`~adapterhub.errors.VersionConflictError` naming both digests, unless ``renumber`` publishes
the content under the destination's next free number instead. Tags of the source that point at
copied versions are then set on the destination (compare-and-swap on a remote), and ``newest``
advances.

Interrupted at any point, both registries stay valid: the destination holds complete versions or
orphan blobs (and pending multipart uploads), which the next run reuses and ``gc`` removes later.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from adapterhub.errors import IntegrityError, NotFoundError, VersionConflictError
from adapterhub.registry.refs import is_integer_version, parse_ref
from adapterhub.registry.registry import (
    MAX_NUMBER_RACES,
    Registry,
    Resolved,
    _version_key,
    canonical_json,
    next_version,
)
from adapterhub.registry.store import LocalStore

#: blobs (and versions) in flight at once
WORKERS = 8
Progress = Callable[[int], None]


@dataclass
class TransferReport:
    """What a copy did: versions ``copied`` (``SRC_REF -> DST_REF``), ``present`` (already there, same
    digest), ``skipped`` (damaged at the source, with why); blobs and bytes sent, and the blobs the
    destination already had."""

    copied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    blobs_sent: int = 0
    bytes_sent: int = 0
    blobs_present: int = 0
    bytes_present: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def _count(self, sent: bool, size: int) -> None:
        with self._lock:
            if sent:
                self.blobs_sent += 1
                self.bytes_sent += size
            else:
                self.blobs_present += 1
                self.bytes_present += size


def select_versions(src: Registry, pattern: str | None = None) -> list[Resolved]:
    """Every version of every name matching a glob (all names when None), in name and version order."""
    out = []
    for name in src.names():
        if pattern and not fnmatchcase(name, pattern):
            continue
        for v, d in sorted(src._versions(name).items(), key=lambda vd: _version_key(vd[0])):
            out.append(Resolved(name, v, d))
    return out


def plan_size(src: Registry, versions: Iterable[Resolved]) -> int:
    """Bytes of every file of these versions (an upper bound of what a copy sends; for a progress bar)."""
    total = 0
    for r in versions:
        try:
            total += int(src._manifest(r.digest, r.ref).get("size") or 0)
        except IntegrityError:
            continue
    return total


def copy_versions(src: Registry, dst: Registry, versions: list[Resolved], *, renumber: bool = False,
                  tags: bool = True, workers: int = WORKERS, progress: Progress | None = None) -> TransferReport:
    """Copy ``versions`` of ``src`` into ``dst`` (see the module's docstring).

    ``progress(n)`` is called with the bytes moved (from several threads, serialised); when it has a
    ``start(total)`` method, that is called first with the bytes of every file of the versions. A blob
    several versions need is sent once (the others wait for it). Copying many versions to a remote
    lists its refs and blobs (per ``blobs/sha256/XX/`` prefix) instead of asking for each one.

    Raises:
        VersionConflictError: a number holds other content at the destination (nothing of that version
            is referenced there; its blobs stay for the next run or gc).
        IntegrityError: a source blob is damaged (refused on arrival; the fix names ``verify``).
        StorageError: the destination is read-only, unreachable or full.
    """
    dst._require_writable("copy versions into it")
    if isinstance(dst.store, LocalStore):
        dst.store.remove_dead_staging()  # what killed copies (and pushes) left in tmp/, as a push does
    if progress is not None and hasattr(progress, "start"):  # a bar that learns its total now
        progress.start(plan_size(src, versions))
    names = sorted({r.name for r in versions})
    with dst._gc_shared(), ThreadPoolExecutor(workers) as blob_pool, ThreadPoolExecutor(workers) as version_pool:
        copy = _Copy(src, dst, blob_pool, progress, renumber, listing=not dst.store.local and len(versions) > 32)
        copy.trust(versions)
        if dst.store.local:
            index = dst.index  # sqlite: marked from this thread only
            for name in names:
                index.mark_dirty(name)
        done: dict[str, list[tuple[Resolved, Resolved]]] = {n: [] for n in names}
        jobs = [version_pool.submit(copy.one, r) for r in versions]
        try:
            for r, job in zip(versions, jobs, strict=True):
                result = job.result()
                if result is not None:
                    done[r.name].append((r, result))
            # each name's tags and newest, several names at once (one or two requests each on a remote)
            jobs += [version_pool.submit(copy.tags, name, done[name]) for name in names if tags and done[name]]
            for job in jobs:
                job.result()
            copy.report.tags.sort(key=lambda t: t.split("@", 1)[0])  # by name, as the names were given
        finally:
            for job in jobs:
                job.cancel()
            if dst.store.local:
                for name in names:
                    with dst._name_lock(name):
                        dst._refresh(name)
            dst._indexed.difference_update(names)
    return copy.report


class _Copy:
    """The state one copy shares between its threads: what the destination holds, blobs in flight."""

    def __init__(self, src: Registry, dst: Registry, pool: ThreadPoolExecutor, progress: Progress | None,
                 renumber: bool, listing: bool) -> None:
        self.src, self.dst, self.pool, self.renumber = src, dst, pool, renumber
        self.report = TransferReport()
        self.progress = progress
        self.lock = threading.Lock()
        self.inflight: dict[str, Future] = {}
        self.prefixes: dict[str, Future] = {}  # blobs/sha256/XX/ -> future of the set of digests there
        self.fans: set[str] | None = None  # the XX of every blobs/sha256/XX/ that holds a blob, listed once
        self.listing = listing
        # every ref of the destination, listed once (many versions to a remote); None: ask per version
        self.refs: set[str] | None = set(dst.store.walk_docs("refs")) if listing else None
        self.trusted: set[str] = set()  # source blobs whose stat stamp shows them hashed and unchanged since

    def trust(self, versions: list[Resolved]) -> None:
        """Find the source blobs a local registry vouches for (checked here: its index is single-threaded)."""
        if not isinstance(self.src.store, LocalStore) or self.dst.store.local:
            return  # a remote source is never trusted; a local destination hashes what arrives anyway
        for r in versions:
            try:
                files = self.src._manifest(r.digest, r.ref)["files"]
            except IntegrityError:
                continue
            self.trusted.update(d for d in ("sha256:" + f["sha256"] for f in files) if self.src._blob_trusted(d))

    def tick(self, n: int) -> None:
        if self.progress and n:
            with self.lock:
                self.progress(n)

    def read_ref(self, key: str) -> str:
        if self.refs is not None and key not in self.refs:
            return ""
        return (self.dst.store.read_doc(key) or "").strip()

    def has_blob(self, digest: str) -> bool:
        if not self.listing:
            return self.dst.store.has_blob(digest)
        fan = digest.removeprefix("sha256:")[:2]
        with self.lock:
            if self.fans is None:  # the blobs/sha256/XX/ prefixes that hold anything: one request
                self.fans = set(self.dst.store.list_docs("blobs/sha256"))
            if fan not in self.fans:  # absent (one stored meanwhile by another: create-if-absent keeps it)
                return False
            fut = self.prefixes.get(fan)
            if fut is None:
                fut = self.prefixes[fan] = Future()
                mine = True
            else:
                mine = False
        if mine:
            try:
                keys = self.dst.store.walk_docs(f"blobs/sha256/{fan}")
                fut.set_result({"sha256:" + fan + k.rsplit("/", 1)[-1] for k in keys})
            except BaseException as e:
                fut.set_exception(e)
        return digest in fut.result()

    def one(self, r: Resolved) -> Resolved | None:
        """Copy one version; returns where it lives at the destination (None: skipped as damaged)."""
        src, dst, report = self.src, self.dst, self.report
        try:
            manifest = src._manifest(r.digest, r.ref)
        except IntegrityError as e:
            with report._lock:
                report.skipped.append(f"{r.ref}: {str(e).splitlines()[0]}")
            return None
        key = dst._key(r.name, "versions", r.version)
        existing = self.read_ref(key)
        if existing == r.digest:
            with report._lock:
                report.present.append(r.ref)
            self.tick(int(manifest.get("size") or 0))
            return r
        if existing and not self.renumber:
            raise _conflict(src, dst, r, existing)
        self.send_blobs(r, manifest)
        if existing:  # renumber: the same files under the destination's next free number
            return _publish_renumbered(dst, r, manifest)
        with dst._name_lock(r.name):
            created = dst.store.create_doc(key, r.digest + "\n")
        if created:
            with report._lock:
                report.copied.append(f"{r.ref} -> {dst.location}")
            return r
        theirs = (dst.store.read_doc(key) or "").strip()
        if theirs == r.digest:  # created meanwhile with the same bytes (a retry, a concurrent copy): success
            with report._lock:
                report.present.append(r.ref)
            return r
        if self.renumber:
            return _publish_renumbered(dst, r, manifest)
        raise _conflict(src, dst, r, theirs)

    def send_blobs(self, r: Resolved, manifest: dict[str, Any]) -> None:
        """Send the file blobs, then the manifest blob, that the destination lacks; each blob is sent by
        one thread however many versions need it."""
        wanted: dict[str, int] = {"sha256:" + f["sha256"]: int(f["size"]) for f in manifest["files"]}
        waits = []
        for digest, size in wanted.items():
            with self.lock:
                fut = self.inflight.get(digest)
                if fut is None:
                    fut = self.inflight[digest] = self.pool.submit(self.send_one, r, digest, size, True)
            waits.append(fut)
        for fut in waits:
            fut.result()
        # the manifest last: a destination holding it never lacks a file it names
        self.send_one(r, r.digest, len(canonical_json(manifest)), False)

    def send_one(self, r: Resolved, digest: str, size: int, counted: bool) -> None:
        if self.has_blob(digest):
            self.report._count(False, size)
            self.tick(size if counted else 0)
            return
        try:
            stream = self.src.store.open_blob(digest)
        except NotFoundError as e:
            raise IntegrityError(f"blob {digest} of '{r.ref}' is missing from {self.src.location}.\n"
                                 f"  file: {self.src.store.describe(digest)}\n  fix: re-push the adapter there; "
                                 "`adapterhub verify` lists every damaged version.", expected=digest) from e
        try:
            self.dst.store.put_blob(digest, size, stream, self.tick if counted else None,
                                    verified=digest in self.trusted)
        finally:
            stream.close()
        self.report._count(True, size)

    def tags(self, name: str, done: list[tuple[Resolved, Resolved]]) -> None:
        """Point the destination's tags where the source's point (for copied versions), then advance newest."""
        src, dst = self.src, self.dst
        where = {s.version: d.version for s, d in done}
        here = {d.version for _, d in done}
        with dst._name_lock(name):
            for tag, version in sorted(src._explicit_tags(name).items()):
                if version in where:
                    dst._set_doc(dst._key(name, "tags", tag), where[version] + "\n")
                    with self.report._lock:
                        self.report.tags.append(f"{name}@{tag} -> {where[version]}")
            newest_src = src._newest(name)
            candidates = [d.version for s, d in done if s.version == newest_src] or [d.version for _, d in done]
            best = max(candidates, key=_version_key)
            key = dst._key(name, "newest")
            if dst.store.create_doc(key, best + "\n"):  # a name new there: one request
                return

            def exists(v: str) -> bool:
                return v in here or bool(dst.store.read_doc(dst._key(name, "versions", v)))

            def advance(old: str | None) -> str | None:
                cur = (old or "").strip()
                if is_integer_version(cur) and is_integer_version(best) and int(cur) >= int(best) and exists(cur):
                    return None
                return best + "\n"

            dst._swap(key, advance)


def _conflict(src: Registry, dst: Registry, r: Resolved, theirs: str) -> VersionConflictError:
    return VersionConflictError(
        f"{r.ref} exists in {dst.location} with other content.\n"
        f"  {src.location}: {r.digest}\n  {dst.location}: {theirs}\n"
        "  Versions are immutable, so it was not copied.\n"
        f"  fix: publish it under {dst.location}'s next free number instead with --renumber "
        f"(e.g. `adapterhub push {r.ref} --to DST --renumber`), or compare the two with `adapterhub show`.",
        ref=r.ref, ours=r.digest, theirs=theirs)


def _publish_renumbered(dst: Registry, r: Resolved, manifest: dict[str, Any]) -> Resolved:
    """The same files as a new version under the destination's next free number (a new manifest)."""
    with dst._name_lock(r.name):
        for _ in range(MAX_NUMBER_RACES):
            versions = dst._versions(r.name)
            version = next_version(versions)
            new = {**manifest, "version": version}
            digest = dst.store.put_bytes(canonical_json(new))
            if dst.store.create_doc(dst._key(r.name, "versions", version), digest + "\n"):
                return Resolved(r.name, version, digest)
    raise VersionConflictError(f"{r.name}: lost the race for a version number {MAX_NUMBER_RACES} times; retry.",
                               ref=r.ref)


def resolve_at(src: Registry, ref: str) -> Resolved:
    """Resolve a reference at ``src`` (any store)."""
    return src.resolve(parse_ref(ref))


# --- what the commands call ---------------------------------------------------------------------------


def push_ref(local: Registry, ref: str, to: str, *, endpoint_url: str | None = None, renumber: bool = False,
             progress: Progress | None = None, **store_options: Any) -> tuple[TransferReport, Registry]:
    """``adapterhub push REF --to REMOTE``: copy one version of ``local`` to a remote (name, URL or path)."""
    from adapterhub.registry.remotes import open_registry

    dst = open_registry(to, local, endpoint_url, **store_options)
    res = local.resolve(ref)
    return copy_versions(local, dst, [res], renumber=renumber, progress=progress), dst


def pull_ref(local: Registry, ref: str, src: str, *, endpoint_url: str | None = None, renumber: bool = False,
             progress: Progress | None = None, **store_options: Any) -> tuple[TransferReport, Resolved]:
    """``adapterhub pull REF --from REMOTE``: copy one version of a remote into ``local``; returns where it
    lives locally (its number, unless ``renumber`` had to publish it under the next free one)."""
    from adapterhub.registry.remotes import open_registry

    remote = open_registry(src, local, endpoint_url, create=False, **store_options)
    res = remote.resolve(ref)
    report = copy_versions(remote, local, [res], renumber=renumber, progress=progress)
    if report.skipped:
        raise IntegrityError(f"{res.ref} at {remote.location} is damaged: {report.skipped[0]}")
    here = local._versions(res.name)
    if here.get(res.version) == res.digest:
        return report, res
    # renumbered: the newest local version holding these files
    for v in sorted(here, key=_version_key, reverse=True):
        if local._manifest(here[v]).get("files") == remote._manifest(res.digest).get("files"):
            return report, Resolved(res.name, v, here[v])
    return report, res


def sync(local: Registry | None, src: str, dst: str, pattern: str | None = None, *, endpoint_url: str | None = None,
         renumber: bool = False, progress: Progress | None = None,
         **store_options: Any) -> tuple[TransferReport, Registry, Registry]:
    """``adapterhub sync SRC DST [PATTERN]``: copy every version of the names matching ``pattern``."""
    from adapterhub.registry.remotes import open_registry

    a = open_registry(src, local, endpoint_url, create=False, **store_options)
    versions = select_versions(a, pattern)
    if pattern and not versions:  # a mistyped pattern must not look like a sync that found nothing new
        raise NotFoundError(f"no name in {a.location} matches {pattern!r}; nothing was copied.\n  fix: check the "
                            f"pattern (a glob such as 'team/*'); `adapterhub --registry {a.location} list` shows the "
                            "names.")
    b = open_registry(dst, local, endpoint_url, **store_options)
    return copy_versions(a, b, versions, renumber=renumber, progress=progress), a, b
