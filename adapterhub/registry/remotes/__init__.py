"""Remote registries: where they are (URLs), what they are called (``remotes.json``), what they guarantee.

A remote is another registry with exactly the local layout (``registry/FORMAT.md``), reached through a
:class:`~adapterhub.registry.store.Store`:

==========================  ===================================================================
``s3://BUCKET[/PREFIX]``    :class:`~adapterhub.registry.remotes.s3.S3Store` (boto3; ``--endpoint-url``
                            for SeaweedFS, MinIO, ...; credentials from the standard AWS variables)
``file:///shared/dir``      a registry directory on a shared file system (the local backend)
a path                      a local registry
``hf://ORG/REPO[@REV]``     the Hugging Face Hub (:mod:`adapterhub.registry.remotes.hf`; not a Store:
                            one repo holds one adapter, versions are commits and tags)
==========================  ===================================================================

Names given with ``adapterhub remote add NAME URL`` are kept in the local registry's ``remotes.json``
(never credentials). :func:`probe` checks that a store honours conditional writes before it is added.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from adapterhub.errors import IntegrityError, RemoteError, UnsafeRemoteError
from adapterhub.registry.store import LocalStore, Store, os_errors

if TYPE_CHECKING:
    from adapterhub.registry.registry import Registry

REMOTES_FILE = "remotes.json"
_REMOTE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True)
class Location:
    """A parsed remote location: ``kind`` is ``s3``, ``file`` or ``hf``."""

    kind: str
    url: str
    endpoint_url: str | None = None
    bucket: str | None = None
    prefix: str = ""
    path: Path | None = None
    repo: str | None = None
    revision: str | None = None


def parse_location(text: str, endpoint_url: str | None = None) -> Location:
    """Parse ``s3://BUCKET[/PREFIX]``, ``file:///DIR``, ``hf://ORG/REPO[@REV]`` or a local path.

    Raises:
        RemoteError: a malformed URL or an unknown scheme, before anything is contacted.
    """
    if "://" not in text:
        return Location("file", Path(text).expanduser().absolute().as_uri(),
                        path=Path(text).expanduser().absolute())
    scheme = text.split("://", 1)[0].lower()
    if scheme == "s3":
        u = urlparse(text)
        if not _BUCKET.fullmatch(u.netloc or ""):
            raise RemoteError(f"invalid S3 URL {text!r}: the bucket name is not 3-63 lower-case letters, digits, '.' "
                              "and '-'.\n  fix: write s3://BUCKET[/PREFIX], e.g. s3://my-bucket/adapters.", remote=text)
        prefix = u.path.strip("/")
        return Location("s3", f"s3://{u.netloc}/{prefix}".rstrip("/"), endpoint_url=endpoint_url, bucket=u.netloc,
                        prefix=prefix)
    if scheme == "file":
        u = urlparse(text)
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise RemoteError(f"invalid file URL {text!r}: it names no absolute path on this machine.\n"
                              "  fix: write file:///ABSOLUTE/PATH (three slashes), or give the path itself.",
                              remote=text)
        path = Path(unquote(u.path))
        return Location("file", path.as_uri(), path=path)
    if scheme == "hf":
        body = text[len("hf://"):]
        repo, _, rev = body.partition("@")
        if not _HF_REPO.fullmatch(repo):
            raise RemoteError(f"invalid Hub URL {text!r}: it names no ORG/REPO.\n  fix: write "
                              "hf://ORG/REPO[@REVISION].", remote=text)
        return Location("hf", text, repo=repo, revision=rev or None, endpoint_url=endpoint_url)
    raise RemoteError(f"unknown remote scheme in {text!r}.\n  fix: use s3://BUCKET[/PREFIX], file:///DIR, "
                      "hf://ORG/REPO or a local path.", remote=text)


def open_store(loc: Location, **options: Any) -> Store:
    """The store a location names (``options`` go to :class:`S3Store`: part sizes, connections)."""
    if loc.kind == "s3":
        from adapterhub.registry.remotes.s3 import S3Store

        assert loc.bucket is not None
        return S3Store(loc.bucket, loc.prefix, endpoint_url=loc.endpoint_url, **options)
    if loc.kind == "file":
        assert loc.path is not None
        return LocalStore(loc.path)
    raise RemoteError(f"{loc.url} is a Hugging Face Hub repository, not a registry: it holds one adapter.\n"
                      "  fix: push the directory to the local registry first, then `adapterhub push REF --to "
                      f"{loc.url}`; `adapterhub pull {loc.url}` imports from it.", remote=loc.url)


# --- remotes.json -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """A named remote: its URL, the endpoint of a non-AWS S3 server, and what the probe found."""

    name: str
    url: str
    endpoint_url: str | None = None
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> Location:
        return parse_location(self.url, self.endpoint_url)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_remote_name(name: str) -> str:
    if not isinstance(name, str) or not _REMOTE_NAME.fullmatch(name) or ".." in name:
        raise RemoteError(f"invalid remote name {name!r}.\n  fix: use lower-case letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit (e.g. origin, team-s3).", remote=str(name))
    return name


def load_remotes(registry: Registry) -> dict[str, Remote]:
    """The remotes configured for a local registry (``<registry>/remotes.json``)."""
    if registry.root is None:
        return {}
    path = registry.root / REMOTES_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise RemoteError(f"{path} is damaged ({e}).\n  fix: remove it and add the remotes again "
                          "(`adapterhub remote add NAME URL`).") from e
    out = {}
    for name, r in (doc.get("remotes") or {}).items() if isinstance(doc, dict) else ():
        if isinstance(r, dict) and isinstance(r.get("url"), str):
            out[name] = Remote(name, r["url"], r.get("endpoint_url"), r.get("probe") or {})
    return out


def _save_remotes(registry: Registry, remotes: dict[str, Remote]) -> None:
    assert registry.root is not None
    path = registry.root / REMOTES_FILE
    doc = {"remotes": {n: {k: v for k, v in r.to_dict().items() if k != "name"} for n, r in sorted(remotes.items())}}
    with os_errors(f"writing {path}"):
        tmp = path.with_name(f".{REMOTES_FILE}.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def add_remote(registry: Registry, name: str, url: str, *, endpoint_url: str | None = None,
               replace: bool = False) -> Remote:
    """Name a remote after probing its guarantees (a registry layout is created there if absent).

    Raises:
        RemoteError: a bad name or URL, or the name is taken (without ``replace``).
        UnsafeRemoteError: the server ignores conditional writes; nothing is recorded.
        StorageError: the remote cannot be reached or written.
    """
    check_remote_name(name)
    registry._require_writable("add a remote")
    loc = parse_location(url, endpoint_url)
    if loc.kind == "file" and registry.root is not None and loc.path == registry.root:
        raise RemoteError(f"{url} is this registry itself.\n  fix: name another registry's path or URL.", remote=name)
    if loc.kind == "file":
        from adapterhub.paths import registry_enclosing

        outer = registry_enclosing(loc.path)
        if outer is not None:  # the probe would write into that registry's folders, a push make a registry there
            raise RemoteError(f"{url} lies inside the adapterhub registry at {outer}.\n  fix: choose a path "
                              "outside any registry.", remote=name)
    with registry._lock("remotes.lock"):
        remotes = load_remotes(registry)
        if name in remotes and not replace:
            raise RemoteError(f"remote '{name}' exists ({remotes[name].url}).\n  fix: `adapterhub remote remove "
                              f"{name}` first, or choose another name.", remote=name)
        report: dict[str, Any] = {}
        if loc.kind != "hf":
            report = probe(open_store(loc), name=name).to_dict()
        remote = Remote(name, loc.url if loc.kind != "file" else str(loc.path), endpoint_url, report)
        remotes[name] = remote
        _save_remotes(registry, remotes)
    return remote


def remove_remote(registry: Registry, name: str) -> Remote:
    """Forget a remote (nothing on it is touched)."""
    registry._require_writable("remove a remote")
    with registry._lock("remotes.lock"):
        remotes = load_remotes(registry)
        if name not in remotes:
            raise RemoteError(f"no remote named '{name}' (remotes: {', '.join(sorted(remotes)) or 'none'}).\n"
                              "  fix: `adapterhub remote list` shows the names.", remote=name)
        gone = remotes.pop(name)
        _save_remotes(registry, remotes)
    return gone


def resolve_location(where: str, local: Registry | None, endpoint_url: str | None = None) -> Location:
    """A ``--to``/``--from``/SRC/DST argument: a URL, a configured remote's name, or a local registry path."""
    if "://" in where:
        return parse_location(where, endpoint_url)
    if local is not None and _REMOTE_NAME.fullmatch(where):
        remotes = load_remotes(local)
        if where in remotes:
            r = remotes[where]
            return parse_location(r.url, endpoint_url or r.endpoint_url)
        if not Path(where).exists():
            raise RemoteError(f"'{where}' is neither a configured remote nor a registry directory (remotes: "
                              f"{', '.join(sorted(remotes)) or 'none'}).\n  fix: `adapterhub remote add {where} URL`, "
                              f"or give a path (./{where}) or a URL.", remote=where)
    return parse_location(where, endpoint_url)


def open_registry(where: str | Location, local: Registry | None = None, endpoint_url: str | None = None, *,
                  create: bool = True, **options: Any) -> Registry:
    """The registry a remote's name, a URL or a path names (created there if absent, unless ``create`` is
    False: a source of a copy must exist).

    Raises:
        RemoteError: a bad name or URL, or (``create=False``) no registry there.
    """
    from adapterhub.registry.registry import Registry

    loc = where if isinstance(where, Location) else resolve_location(where, local, endpoint_url)
    store = LocalStore(loc.path) if loc.kind == "file" else open_store(loc, **options)
    if not create and store.read_doc("registry.json") is None:
        raise RemoteError(f"there is no adapterhub registry at {loc.url if loc.kind != 'file' else loc.path}.\n"
                          "  fix: check the name, URL or path (`adapterhub remote list` shows the named remotes).",
                          remote=str(where))
    return Registry(loc.path) if loc.kind == "file" else Registry(store)


# --- the probe --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeReport:
    """What the server did with each conditional write the probe tried."""

    location: str
    checks: tuple[tuple[str, bool, str], ...]

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [{"check": c, "ok": ok, "saw": saw} for c, ok, saw in self.checks]}


def probe(store: Store, *, name: str | None = None, raise_unsafe: bool = True) -> ProbeReport:
    """Check that ``store`` honours the conditional writes a registry relies on, with a scratch key.

    1. create-if-absent of a new key succeeds; 2. create-if-absent of that key again is refused and
    leaves it unchanged (``If-None-Match: *`` -> 412); 3. compare-and-swap with the current token
    succeeds; 4. compare-and-swap with the now stale token is refused (``If-Match`` -> 412); 5. a blob
    whose bytes do not hash to its name is refused and not stored (on S3: the server checks
    ``x-amz-checksum-sha256``, which is how pushes are verified).

    Raises:
        UnsafeRemoteError: with ``raise_unsafe``, when any check fails (the message says which and why
            it matters).
    """
    key = f"locks/probe/{secrets.token_hex(8)}"
    checks: list[tuple[str, bool, str]] = []
    try:
        created = store.create_doc(key, "first\n")
        checks.append(("create a new key if absent", created, "created" if created else "refused"))
        again = store.create_doc(key, "second\n")
        now = store.read_doc_token(key)
        kept = now is not None and now[0] == "first\n"
        checks.append(("refuse to create an existing key (If-None-Match: *)", not again and kept,
                       "refused, content kept" if not again and kept else
                       f"accepted: the key now holds {now[0].strip() if now else None!r}"))
        token = now[1] if now else ""
        swapped = store.swap_doc(key, "third\n", token) if now else False
        checks.append(("replace with the current token (If-Match)", swapped, "replaced" if swapped else "refused"))
        stale = store.swap_doc(key, "fourth\n", token)
        after = store.read_doc(key)
        ok = not stale and after == "third\n"
        checks.append(("refuse to replace with a stale token (If-Match)", ok,
                       "refused, content kept" if ok else f"accepted: the key now holds {(after or '').strip()!r}"))
        named = "sha256:" + hashlib.sha256(f"adapterhub probe {key}".encode()).hexdigest()
        try:
            store.put_blob(named, 5, io.BytesIO(b"wrong"))
            refused = False
        except IntegrityError:
            refused = True
        kept_out = refused and not store.has_blob(named)
        checks.append(("refuse a blob whose bytes do not hash to its name (x-amz-checksum-sha256)", kept_out,
                       "refused, nothing stored" if kept_out else "accepted: the wrong bytes were stored"))
    except BaseException:
        with contextlib.suppress(Exception):  # the first failure is the one to report
            store.delete_doc(key)
        raise
    store.delete_doc(key)
    store.delete_blob(named)
    report = ProbeReport(store.location, tuple(checks))
    if raise_unsafe and not report.ok:
        failed = tuple(c for c, ok, _ in checks if not ok)
        lines = "\n".join(f"  - {c}: {saw}" for c, ok, saw in checks if not ok)
        raise UnsafeRemoteError(
            f"{store.location} does not honour the writes a registry relies on:\n{lines}\n"
            "  Two publishers of one name could then both create the same version number, and a tag could be "
            "moved over a change it never saw; adapterhub relies on these writes instead of a lock server.\n"
            "  fix: use a server that implements them (SeaweedFS 4.18 or newer; AWS S3 documents both since 2024), "
            "or share a directory (file:///shared/dir).", remote=name or store.location, failed=failed)
    return report
