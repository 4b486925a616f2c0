"""A stand-in for the Hugging Face Hub (the live Hub cannot be reached here).

Two halves share one in-memory state of repos (commits of whole file trees, branches, tags):

* :class:`StandInApi` has the ``HfApi`` methods adapterhub's push calls (``list_repo_refs``,
  ``list_repo_files``, ``create_commit``, ``create_tag``) and enforces what the Hub enforces:
  ``create_commit(parent_commit=X)`` is refused with HTTP 412 when the branch head is not ``X``, an
  existing tag with HTTP 409; errors are ``huggingface_hub``'s own ``HfHubHTTPError`` carrying an
  ``httpx`` response with that status.
* :class:`HubServer` serves the same state over HTTP on 127.0.0.1 with the routes
  ``huggingface_hub.snapshot_download`` (2.x) uses: ``GET /api/models/{repo}/revision/{rev}`` (the commit
  and its files), ``GET /api/models/{repo}/tree/{rev}`` (the file listing) and
  ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``, the bytes).
  So pulls go through huggingface_hub's real download code and lay out a real HF cache.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    commits: dict[str, tuple[str | None, dict[str, bytes]]] = field(default_factory=dict)  # oid -> (parent, files)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)


def _http_error(status: int, message: str) -> Exception:
    import httpx2 as httpx
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx.Response(status, request=httpx.Request("POST", "http://hub.stand-in/api"))
    return HfHubHTTPError(f"{status}: {message}", response=response)


class StandInApi:
    """The ``HfApi`` methods a push uses, over :class:`Repo` state; ``endpoint`` is the HTTP half."""

    def __init__(self, endpoint: str | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.endpoint = endpoint
        self.lock = threading.Lock()
        self.commit_calls = 0
        self.before_commit = None  # a hook: called once per create_commit before the parent check

    def create_repo(self, repo_id: str) -> None:
        self.repos.setdefault(repo_id, Repo())

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise _http_error(404, f"repository {repo_id} not found")
        return self.repos[repo_id]

    def list_repo_refs(self, repo_id: str, **_: object):  # noqa: ANN201 - huggingface_hub's GitRefs
        from huggingface_hub.hf_api import GitRefInfo, GitRefs

        repo = self._repo(repo_id)
        return GitRefs(branches=[GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit=c)
                                 for n, c in repo.branches.items()],
                       converts=[], tags=[GitRefInfo(name=n, ref=f"refs/tags/{n}", target_commit=c)
                                          for n, c in repo.tags.items()])

    def list_repo_files(self, repo_id: str, revision: str | None = None, **_: object) -> list[str]:
        repo = self._repo(repo_id)
        oid = repo.resolve(revision or "main")
        return sorted(repo.commits[oid][1]) if oid else []

    def create_commit(self, repo_id: str, operations, *, commit_message: str, commit_description: str | None = None,
                      revision: str | None = None, parent_commit: str | None = None, **_: object):  # noqa: ANN001, ANN201
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.hf_api import CommitInfo

        self.commit_calls += 1
        if self.before_commit is not None:
            hook, self.before_commit = self.before_commit, None
            hook(self)
        with self.lock:
            repo = self._repo(repo_id)
            branch = revision or "main"
            head = repo.branches.get(branch)
            if parent_commit is not None and parent_commit != head:
                raise _http_error(412, f"A commit has happened since. Please refresh and try again. "
                                       f"(parent {parent_commit} is not the head {head})")
            files = dict(repo.commits[head][1]) if head else {}
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    src = op.path_or_fileobj
                    files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str | Path) else bytes(src)
                elif isinstance(op, CommitOperationDelete):
                    files.pop(op.path_in_repo, None)
            oid = hashlib.sha1(json.dumps([head, commit_message, sorted((p, hashlib.sha256(b).hexdigest())
                                                                      for p, b in files.items())]).encode()).hexdigest()
            repo.commits[oid] = (head, files)
            repo.branches[branch] = oid
        return CommitInfo(commit_url=f"{self.endpoint}/{repo_id}/commit/{oid}", commit_message=commit_message,
                          commit_description=commit_description or "", oid=oid, _endpoint=self.endpoint)

    def commit_files(self, repo_id: str, files: dict[str, bytes], message: str = "upload") -> str:
        """Commit files directly (what another client's push looks like): returns the new head."""
        from huggingface_hub import CommitOperationAdd

        head = self.repos[repo_id].branches.get("main")
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b) for p, b in files.items()]
        return self.create_commit(repo_id, ops, commit_message=message, parent_commit=head).oid

    def create_tag(self, repo_id: str, *, tag: str, revision: str | None = None, tag_message: str | None = None,
                   **_: object) -> None:
        with self.lock:
            repo = self._repo(repo_id)
            if tag in repo.tags:
                raise _http_error(409, f"tag {tag} already exists")
            oid = repo.resolve(revision or "main")
            if oid is None:
                raise _http_error(404, f"revision {revision} not found")
            repo.tags[tag] = oid


class HubServer:
    """The read half of the Hub over HTTP (what ``snapshot_download``/``hf_hub_download`` call)."""

    def __init__(self, api: StandInApi) -> None:
        self.api = api
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        api.endpoint = self.url
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):  # noqa: ANN202
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      head: bool = False) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                server.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("tree", "revision"):
                    repo_id = "/".join(parts[2:4])
                    rev = parts[5] if parts[4] == "tree" else "/".join(parts[5:])
                    repo = server.api.repos.get(repo_id)
                    oid = repo.resolve(rev) if repo else None
                    if oid is None:
                        return self._send(404, b'{"error": "Revision Not Found"}',
                                          {"X-Error-Code": "RevisionNotFound" if repo else "RepoNotFound"}, head)
                    files = repo.commits[oid][1]
                    if parts[4] == "revision":
                        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": oid, "private": False,
                                           "siblings": [{"rfilename": p} for p in sorted(files)]}).encode()
                        return self._send(200, body, {"Content-Type": "application/json"}, head)
                    body = json.dumps([{"type": "file", "path": p, "size": len(b),
                                        "oid": hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()}
                                       for p, b in sorted(files.items())]).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, rev, rel = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    repo = server.api.repos.get(repo_id)
                    oid = repo.resolve(rev) if repo else None
                    data = repo.commits[oid][1].get(rel) if oid else None
                    if data is None:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    etag = hashlib.sha256(data).hexdigest()
                    return self._send(200, data, {"X-Repo-Commit": oid, "ETag": f'"{etag}"',
                                                  "Content-Type": "application/octet-stream"}, head)
                return self._send(404, b"", {}, head)

            def do_GET(self) -> None:  # noqa: N802
                self._route(False)

            def do_HEAD(self) -> None:  # noqa: N802
                self._route(True)

        return Handler
