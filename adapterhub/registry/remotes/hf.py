"""The Hugging Face Hub as a remote (``hf://ORG/REPO[@REVISION]``), through ``huggingface_hub``.

A Hub repo holds one adapter; its versions are commits, each tagged ``v<VERSION>``.

**Push** (:func:`push_to_hub`): one version becomes exactly one ``create_commit`` holding the adapter in
PEFT's format (the format the Hub's PEFT integration loads; other kinds keep their stored format), the
registry manifest (``adapterhub.manifest.json``, the canonical bytes: its sha256 is the version's
digest) and a model card (``README.md``, :class:`huggingface_hub.ModelCard`) carrying the registry's
metadata and lineage; other files of the repo are left as they are (nothing is deleted). The
commit names its ``parent_commit`` (the branch head it was built on): the Hub refuses it with HTTP
412 when the branch moved meanwhile, and the push rebuilds on the new head and retries. Then the
tag ``v<VERSION>`` is created; a tag that exists already holding the same manifest digest is a success
(a re-run), one holding another is a conflict. ``upload_folder`` is not used: it may split into
several commits.

**Pull** (:func:`pull_from_hub`): ``snapshot_download`` of the revision (with ``HF_HUB_OFFLINE=1`` it
resolves from the local HF cache only) and a push of the snapshot into the local registry, recording
the repo and the commit it resolved to as the version's ``origin``. Any PEFT adapter repo works; one
already imported (same files) is not imported twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.errors import NotFoundError, RemoteError, VersionConflictError
from adapterhub.registry.registry import Registry, canonical_json

MANIFEST_FILE = "adapterhub.manifest.json"
#: a commit refused with 412 (the branch moved) is rebuilt and retried this many times
MAX_COMMIT_RETRIES = 8
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubPush:
    """``ref`` was pushed to ``repo`` as ``commit``, tagged ``tag``; ``created`` is False when the tag
    already held this version (nothing was committed)."""

    ref: str
    repo: str
    commit: str
    tag: str
    created: bool
    attempts: int = 1


@dataclass(frozen=True)
class HubPull:
    """``repo`` at ``commit`` lives in the local registry as ``ref`` (``digest``); ``created`` is False when
    a version of that name already held the same files."""

    ref: str
    digest: str
    repo: str
    commit: str
    created: bool


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _api(api: Any, endpoint: str | None) -> Any:
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)


def local_name(repo: str) -> str:
    """The registry name a Hub repo is imported under by default: ``ORG/REPO`` lower-cased, other
    characters than ``[a-z0-9._-]`` replaced by ``-``."""
    parts = [re.sub(r"[^a-z0-9._-]", "-", p.lower()).strip("-._")[:64] or "x" for p in repo.split("/", 1)]
    return "/".join(parts).replace("..", "-")


def model_card(manifest: dict[str, Any], digest: str, ref: str, readme: str | None) -> str:
    """The model card text: YAML metadata (base model, PEFT, tags) and the registry's metadata and lineage."""
    from huggingface_hub import ModelCard, ModelCardData

    base = manifest.get("base") or {}
    data = ModelCardData(base_model=base.get("name_or_path") or None, library_name="peft",
                         tags=sorted({"adapterhub", manifest["kind"], *manifest.get("tags", [])}))
    lines = [f"# {manifest['name']} v{manifest['version']}", "",
             manifest.get("description") or f"A {manifest['kind']} adapter published from an adapterhub registry.",
             "", "## adapterhub registry", "",
             f"- reference: `{ref}`", f"- manifest digest: `{digest}` (sha256 of `{MANIFEST_FILE}`)",
             f"- kind: {manifest['kind']}, stored format: {manifest['format']}",
             f"- base: {base.get('name_or_path') or 'not recorded'}"
             + (f" (fingerprint `{base['fingerprint']}`)" if base.get("fingerprint") else ""),
             f"- parameters: {manifest.get('num_parameters', 0):,}; {manifest.get('size', 0):,} bytes",
             f"- created: {manifest.get('created_at')}"]
    if manifest.get("metrics"):
        lines.append(f"- metrics: `{json.dumps(manifest['metrics'], sort_keys=True)}`")
    if manifest.get("parents"):
        lines += ["", "## Lineage", ""]
        lines += [f"- {p.get('ref')} (`{p.get('digest')}`), weight {p.get('weight')}" for p in manifest["parents"]]
        if manifest.get("recipe"):
            lines.append(f"- recipe: `{json.dumps(manifest['recipe'], sort_keys=True)}`")
    if readme:
        lines += ["", "## The adapter's own card", "", readme.strip()]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n"))


def push_to_hub(local: Registry, ref: str, url: str, *, api: Any = None, endpoint: str | None = None,
                branch: str = "main") -> HubPush:
    """Publish version ``ref`` of ``local`` to the Hub repo ``url`` as one commit and a tag ``v<VERSION>``.

    Raises:
        RemoteError: a malformed URL, or the Hub refused (the message names what to check).
        VersionConflictError: the tag ``v<VERSION>`` exists holding another manifest digest.
    """
    from huggingface_hub import CommitOperationAdd

    from adapterhub.registry.remotes import parse_location

    loc = parse_location(url)
    if loc.kind != "hf" or loc.repo is None:
        raise RemoteError(f"{url} is not an hf://ORG/REPO URL.", remote=url)
    if loc.revision:
        branch = loc.revision
    api = _api(api, endpoint)
    res = local.resolve(ref)
    manifest = local.manifest(res.ref)
    tag = f"v{res.version}"
    try:
        existing = _tag_digest(api, loc.repo, tag)
    except Exception as e:
        raise _hub_error(e, f"reading the refs of hf://{loc.repo}") from e
    if existing is not None:
        digest, commit = existing
        if digest == res.digest:
            return HubPush(res.ref, loc.repo, commit, tag, False, 0)
        raise VersionConflictError(
            f"hf://{loc.repo} has tag {tag} holding other content.\n  local: {res.digest}\n  hub:   {digest}\n"
            "  fix: push another version, or delete the tag on the Hub if it is wrong.",
            ref=res.ref, ours=res.digest, theirs=digest)
    with tempfile.TemporaryDirectory(prefix="adapterhub-hf-") as tmp:
        out = Path(tmp) / "adapter"
        kind, layout = manifest["kind"], (manifest.get("spec") or {}).get("layout", "peft")
        peft = kind in ("lora", "ia3") or (kind == "prefix" and layout == "peft")
        local.pull(res.ref, out, format="peft" if peft else None)
        readme = None
        for p in sorted(out.iterdir()):
            if p.name.lower() in ("readme", "readme.md", "readme.txt", "readme.rst"):
                readme = p.read_text(encoding="utf-8", errors="replace")
                p.unlink()
        (out / "README.md").write_text(model_card(manifest, res.digest, res.ref, readme), encoding="utf-8")
        (out / MANIFEST_FILE).write_bytes(canonical_json(manifest))
        ours = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(out / rel)) for rel in ours]
        for attempt in range(1, MAX_COMMIT_RETRIES + 1):
            try:
                head = _head(api, loc.repo, branch)
                info = api.create_commit(loc.repo, ops, commit_message=f"adapterhub: {res.ref} ({res.digest[:19]})",
                                         commit_description=f"manifest digest {res.digest}", revision=branch,
                                         parent_commit=head)
                break
            except Exception as e:
                if _status(e) == 412 and attempt < MAX_COMMIT_RETRIES:
                    continue  # the branch moved under us: rebuild on the new head
                raise _hub_error(e, f"committing {res.ref} to hf://{loc.repo}") from e
    try:
        api.create_tag(loc.repo, tag=tag, revision=info.oid, tag_message=res.digest)
    except Exception as e:
        if _status(e) == 409:  # created meanwhile by a concurrent push of this version: same check as above
            again = _tag_digest(api, loc.repo, tag)
            if again is not None and again[0] == res.digest:
                return HubPush(res.ref, loc.repo, again[1], tag, False, attempt)
        raise _hub_error(e, f"tagging hf://{loc.repo} {tag}") from e
    return HubPush(res.ref, loc.repo, info.oid, tag, True, attempt)


def _head(api: Any, repo: str, branch: str) -> str | None:
    refs = api.list_repo_refs(repo)
    for b in refs.branches:
        if b.name == branch:
            return b.target_commit
    return None


def _tag_digest(api: Any, repo: str, tag: str) -> tuple[str, str] | None:
    """(manifest digest, commit) the tag holds, or None when there is no such tag."""
    refs = api.list_repo_refs(repo)
    for t in refs.tags:
        if t.name == tag:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo, MANIFEST_FILE, revision=t.target_commit,
                                   endpoint=getattr(api, "endpoint", None))
            data = Path(path).read_bytes()
            return f"sha256:{hashlib.sha256(data).hexdigest()}", t.target_commit
    return None


def _hub_error(e: Exception, what: str) -> Exception:
    """A :class:`RemoteError` saying what to check (adapterhub's own errors pass through unchanged)."""
    from adapterhub.errors import AdapterHubError

    if isinstance(e, AdapterHubError):
        return e
    status = _status(e)
    if status in (401, 403):
        fix = "log in (`hf auth login`, or set HF_TOKEN) with a token that may write this repo"
    elif status == 404:
        fix = "create the repo first (`hf repo create ORG/REPO`) and check its name"
    elif status == 412:
        fix = f"the branch kept moving under {MAX_COMMIT_RETRIES} attempts; retry"
    else:
        fix = "check the network and the Hub's status; running the command again is safe"
    first = str(e).strip().splitlines()[0].rstrip(". ") if str(e).strip() else type(e).__name__
    return RemoteError(f"{what} failed: {first}.\n  fix: {fix}.")


def pull_from_hub(local: Registry, url: str, *, name: str | None = None, endpoint: str | None = None,
                  cache_dir: str | Path | None = None) -> HubPull:
    """Import the PEFT adapter of a Hub repo (at ``@REVISION``, default ``main``) into ``local``.

    With ``HF_HUB_OFFLINE=1`` the revision is resolved from the local HF cache only. The version records
    ``origin = {kind: hf, repo, commit, revision}``.

    Raises:
        RemoteError: a malformed URL, an unreachable Hub, or a revision missing from the cache offline.
        FormatError: the repo holds no adapter adapterhub can read.
    """
    from huggingface_hub import snapshot_download

    from adapterhub.registry.refs import check_name
    from adapterhub.registry.remotes import parse_location

    loc = parse_location(url)
    if loc.kind != "hf" or loc.repo is None:
        raise RemoteError(f"{url} is not an hf://ORG/REPO[@REVISION] URL.", remote=url)
    try:
        snap = Path(snapshot_download(loc.repo, revision=loc.revision or "main", endpoint=endpoint,
                                      cache_dir=cache_dir))
    except Exception as e:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE and type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise RemoteError(f"hf://{loc.repo}@{loc.revision or 'main'} is not in the local Hugging Face cache and "
                              "HF_HUB_OFFLINE=1 forbids downloading it.\n  fix: pull it once online (or unset "
                              "HF_HUB_OFFLINE).", remote=url) from e
        if _status(e) == 404 or type(e).__name__ in ("RepositoryNotFoundError", "RevisionNotFoundError"):
            raise NotFoundError(f"hf://{loc.repo}@{loc.revision or 'main'} does not exist (or is private).\n"
                                "  fix: check the repo and revision; log in for a private repo.", ref=url) from e
        raise _hub_error(e, f"downloading hf://{loc.repo}") from e
    commit = snap.name if _COMMIT.fullmatch(snap.name) else None
    if commit is None:
        raise RemoteError(f"{snap} is not a snapshot of a commit of hf://{loc.repo}.", remote=url)
    target = check_name(name or local_name(loc.repo))
    description = f"imported from hf://{loc.repo}@{commit[:12]}"
    manifest_file = snap / MANIFEST_FILE
    if manifest_file.is_file():
        try:
            description = json.loads(manifest_file.read_text(encoding="utf-8")).get("description") or description
        except (ValueError, UnicodeDecodeError):
            pass
    result = local.push(snap, target, description=description,
                        origin={"kind": "hf", "repo": loc.repo, "commit": commit, "revision": loc.revision})
    return HubPull(result.ref, result.digest, loc.repo, commit, result.created)
