"""A registry in an S3-compatible bucket (AWS S3, SeaweedFS >= 4.18, MinIO, ...), through boto3.

The bucket holds exactly the local layout under a prefix (``registry/FORMAT.md``): ``registry.json``,
``blobs/sha256/ab/cdef...`` and ``refs/...``. Coordination needs no lock and no server of ours, only
the bucket's conditional writes: a version ref is created with ``If-None-Match: *`` (one creator
wins; a 412 means another publisher took the number) and movable refs are replaced with
``If-Match: <ETag>`` (compare-and-swap). :func:`adapterhub.registry.remotes.probe` refuses a server
that ignores them.

Integrity: a blob's key is its sha256. A blob up to :attr:`S3Store.multipart_threshold` is sent in
one ``PutObject`` carrying ``x-amz-checksum-sha256`` = the digest, so the server itself refuses
bytes that do not hash to the name (``BadDigest``). A larger blob goes in multipart parts (each with
botocore's CRC32 transport checksum, verified by the server); the sha256 of every byte sent is
computed while sending and the upload is completed only if it equals the name. An interrupted
multipart upload is resumed: the parts of the pending upload for that key whose size and ETag (MD5)
match the local bytes are reused, so a re-run re-sends at most the part that was in flight.
Downloads are hashed on arrival by the registry (never trusted).

boto3 is imported only when an ``s3://`` store is opened (``pip install adapterhub[s3]``).
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from adapterhub.errors import IntegrityError, NotFoundError, RemoteError, StorageError
from adapterhub.registry.store import (
    CHUNK,
    LAYOUT,
    BlobInfo,
    Leftover,
    Progress,
    Put,
    blob_key,
    corrupt,
    hash_file,
    verify_bytes,
)

MiB = 1024 * 1024
#: blobs above this size go in multipart uploads (resumable)
MULTIPART_THRESHOLD = 64 * MiB
#: size of one multipart part (S3's minimum is 5 MiB; at most 10,000 parts)
PART_SIZE = 32 * MiB


@dataclass
class Traffic:
    """Bytes this store sent and received, and bytes of multipart parts reused instead of re-sent."""

    sent: int = 0
    received: int = 0
    reused: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def _boto3() -> Any:
    try:
        import boto3
    except ImportError as e:
        raise RemoteError("s3:// registries need boto3, which is not installed.\n"
                          "  fix: pip install 'adapterhub[s3]'") from e
    return boto3


class S3Store:
    """A :class:`~adapterhub.registry.store.Store` in ``s3://BUCKET/PREFIX``.

    Credentials come from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, ...); ``endpoint_url`` points at a non-AWS server (path-style addressing).
    Thread-safe: one boto3 client is shared by every transfer thread.
    """

    local = False

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, part_size: int = PART_SIZE,
                 multipart_threshold: int = MULTIPART_THRESHOLD, max_connections: int = 32) -> None:
        boto3 = _boto3()
        import os

        from botocore.config import Config

        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.writable = True
        self.part_size = max(5 * MiB, part_size)
        self.multipart_threshold = max(self.part_size, multipart_threshold)
        self.traffic = Traffic()
        # downloads are hashed end to end (sha256 of what arrives), so botocore's CRC32 of responses is
        # not needed; uploads keep it (a multipart part's transport checksum, checked by the server)
        config = Config(max_pool_connections=max_connections, retries={"max_attempts": 5, "mode": "standard"},
                        connect_timeout=10, read_timeout=120, response_checksum_validation="when_required",
                        s3={"addressing_style": "path"} if endpoint_url else {})
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                     config=config)
        from botocore.exceptions import BotoCoreError, ClientError

        self._ClientError = ClientError
        self._BotoCoreError = BotoCoreError

    def __repr__(self) -> str:
        return f"S3Store({self.location!r}, endpoint_url={self.endpoint_url!r})"

    # --- keys, errors ---------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return self.prefix + key

    def describe(self, digest: str) -> str:
        """Where a blob lives, for messages."""
        return f"s3://{self.bucket}/{self._k(blob_key(digest))}"

    @staticmethod
    def _code(e: Exception) -> tuple[str, int]:
        resp = getattr(e, "response", None) or {}
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return str(resp.get("Error", {}).get("Code", "")), int(status)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate boto3 failures into :class:`StorageError` saying what to check."""
        try:
            yield
        except (StorageError, IntegrityError, NotFoundError, RemoteError):
            raise
        except self._ClientError as e:
            code, status = self._code(e)
            message = (getattr(e, "response", None) or {}).get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                fix = (f"create the bucket first (e.g. `aws s3 mb s3://{self.bucket}"
                       f"{' --endpoint-url ' + self.endpoint_url if self.endpoint_url else ''}`)")
            elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden") or status == 403:
                fix = ("check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that "
                       "they may read and write this bucket")
            else:
                fix = "check the server's logs; retrying the command resumes where it stopped"
            raise StorageError(f"{what} on {self.location} failed: {code or status} {message}".rstrip(" .")
                               + f".\n  fix: {fix}.") from e
        except self._BotoCoreError as e:
            name = type(e).__name__
            if name in ("NoCredentialsError", "PartialCredentialsError"):
                fix = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                          "ConnectionClosedError"):
                fix = (f"check that the server at {self.endpoint_url or 'the AWS endpoint'} runs and is reachable "
                       "(--endpoint-url); a re-run resumes the transfer")
            else:
                fix = "check the endpoint URL and the network"
            raise StorageError(f"{what} on {self.location} failed: {e}.\n  fix: {fix}.") from e

    def _missing(self, e: Exception) -> bool:
        code, status = self._code(e)
        return code in ("NoSuchKey", "404", "NotFound") or (status == 404 and not code)

    def _precondition(self, e: Exception) -> bool:
        code, status = self._code(e)
        return code == "PreconditionFailed" or status == 412

    # --- layout, coordination -------------------------------------------------------------------

    def check_writable(self) -> bool:
        return self.writable

    def lock(self, rel: str, exclusive: bool = True) -> Any:
        """Nothing to hold: a remote registry's writers rely on conditional writes alone."""
        return nullcontext()

    def stat_stamp(self, digest: str) -> None:
        """A remote blob has no stamp: it is hashed whenever it is read."""
        return None

    def foreign_entries(self) -> list[str]:
        """Entries under the prefix that are not part of a registry's layout."""
        with self._errors("listing the bucket"):
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/", MaxKeys=1000)
        names = [c["Prefix"][len(self.prefix):].rstrip("/") for c in resp.get("CommonPrefixes", [])]
        names += [o["Key"][len(self.prefix):] for o in resp.get("Contents", [])]
        return sorted(n for n in names if n and n not in LAYOUT)

    # --- blobs ------------------------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            self.traffic.add(requests=1)
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except self._ClientError as e:
            if self._missing(e):
                return None
            with self._errors(f"reading {key}"):
                raise

    def has_blob(self, digest: str) -> bool:
        with self._errors(f"looking up blob {digest}"):
            return self._head(blob_key(digest)) is not None

    def blob_size(self, digest: str) -> int | None:
        with self._errors(f"looking up blob {digest}"):
            head = self._head(blob_key(digest))
        return None if head is None else int(head["ContentLength"])

    def put_file(self, src: Path, progress: Progress | None = None, *,
                 trusted: Callable[[str], bool] | None = None) -> Put:
        """Store a local file's content: hashed first (the key is its digest), sent only if missing."""
        digest, size = hash_file(src)
        if self.has_blob(digest):
            if progress:
                progress(size)
            return Put(digest, size, "deduplicated")
        with open(src, "rb") as f:
            self.put_blob(digest, size, f, progress)
        return Put(digest, size, "stored")

    def put_bytes(self, data: bytes) -> str:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if not self.has_blob(digest):
            self._put_small(blob_key(digest), digest, data)
        return digest

    def put_blob(self, digest: str, size: int, reader: BinaryIO, progress: Progress | None = None, *,
                 verified: bool = False) -> None:
        """Send the bytes read from ``reader`` as blob ``digest``; bytes that do not hash to it are refused
        (by the server for a single PUT, before completion for a multipart upload) and nothing is stored.

        ``verified``: the caller knows the bytes hash to ``digest`` (a local blob whose stat stamp is
        unchanged since it was hashed), so a multipart upload skips hashing them again; each part still
        carries a CRC32 the server checks."""
        key = blob_key(digest)
        if size <= self.multipart_threshold:
            # a local file is streamed as the body (seekable: botocore rewinds it to retry); the server
            # computes the body's sha256 and refuses it unless it is `digest` (probed at `remote add`)
            seekable = hasattr(reader, "fileno") and getattr(reader, "seekable", lambda: False)()
            body = reader if seekable else _read_exact(reader, size + 1)
            self._put_small(key, digest, body, size)
            if progress:
                progress(size)
            return
        self._put_multipart(key, digest, reader, progress, verified)

    def _put_small(self, key: str, digest: str, data: bytes | BinaryIO, size: int | None = None) -> None:
        checksum = base64.b64encode(bytes.fromhex(digest.removeprefix("sha256:"))).decode()
        with self._errors(f"uploading {key}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ChecksumSHA256=checksum,
                                       IfNoneMatch="*")
            except self._ClientError as e:
                if self._precondition(e):  # stored meanwhile by another publisher: the same bytes
                    return
                if self._code(e)[0] == "BadDigest":
                    raise IntegrityError(f"the server refused the bytes of {key}: they do not hash to {digest}.\n"
                                         "  fix: the local copy is damaged: `adapterhub verify`, re-push, retry.",
                                         expected=digest) from e
                raise
            finally:
                self.traffic.add(requests=1)
        self.traffic.add(sent=len(data) if isinstance(data, bytes) else int(size or 0))

    def _pending_upload(self, key: str) -> tuple[str | None, dict[int, tuple[int, str]]]:
        """The newest pending multipart upload of ``key`` and its parts {number: (size, ETag)}."""
        full = self._k(key)
        uploads = []
        with self._errors(f"listing pending uploads of {key}"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full):
                uploads += [u for u in page.get("Uploads", []) if u["Key"] == full]
            if not uploads:
                return None, {}
            upload = max(uploads, key=lambda u: u["Initiated"])
            parts: dict[int, tuple[int, str]] = {}
            try:
                for page in self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=full,
                                                                             UploadId=upload["UploadId"]):
                    for p in page.get("Parts", []):
                        parts[int(p["PartNumber"])] = (int(p["Size"]), p["ETag"])
            except self._ClientError as e:
                if self._code(e)[0] == "NoSuchUpload":  # completed or aborted meanwhile
                    return None, {}
                raise
        return upload["UploadId"], parts

    def _put_multipart(self, key: str, digest: str, reader: BinaryIO, progress: Progress | None,
                       verified: bool = False) -> None:
        full = self._k(key)
        upload_id, have = self._pending_upload(key)
        with self._errors(f"uploading {key}"):
            if upload_id is None:
                upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
            h = hashlib.sha256()
            parts: list[dict[str, Any]] = []
            number = 0
            # one part in flight while the next is read and hashed: an interruption loses at most one part
            with ThreadPoolExecutor(1) as pool:
                inflight: Future | None = None
                while chunk := _read_exact(reader, self.part_size):
                    number += 1
                    if not verified:
                        h.update(chunk)
                    old = have.get(number)
                    if old is not None and old[0] == len(chunk) and old[1].strip('"') == hashlib.md5(
                            chunk, usedforsecurity=False).hexdigest():
                        parts.append({"PartNumber": number, "ETag": old[1]})
                        self.traffic.add(reused=len(chunk))
                        if progress:
                            progress(len(chunk))
                        continue
                    if inflight is not None:
                        parts.append(inflight.result())
                    inflight = pool.submit(self._upload_part, full, upload_id, number, chunk, progress)
                if inflight is not None:
                    parts.append(inflight.result())
            actual = digest if verified else f"sha256:{h.hexdigest()}"
            if actual != digest:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
                raise corrupt(digest, actual, f"the bytes sent for {self.describe(digest)}")
            parts.sort(key=lambda p: p["PartNumber"])
            try:
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})
            except self._ClientError as e:
                # completed by a concurrent publisher of the same blob: fine if the blob is there now
                if self._code(e)[0] != "NoSuchUpload" or self._head(key) is None:
                    raise

    def _upload_part(self, full: str, upload_id: str, number: int, chunk: bytes,
                     progress: Progress | None) -> dict[str, Any]:
        resp = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk)
        self.traffic.add(sent=len(chunk), requests=1)
        if progress:
            progress(len(chunk))
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _get(self, key: str) -> Any:
        """The GetObject response, or None when the key is missing."""
        try:
            self.traffic.add(requests=1)
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except self._ClientError as e:
            if self._missing(e):
                return None
            with self._errors(f"reading {key}"):
                raise

    def get_raw(self, digest: str) -> bytes | None:
        """The blob's bytes as stored (not checked), or None when it is missing."""
        with self._errors(f"reading blob {digest}"):
            resp = self._get(blob_key(digest))
            if resp is None:
                return None
            data = resp["Body"].read()
        self.traffic.add(received=len(data))
        return data

    def get_bytes(self, digest: str) -> bytes:
        data = self.get_raw(digest)
        if data is None:
            raise NotFoundError(f"blob {digest} is missing from {self.location}.\n  file: {self.describe(digest)}\n"
                                "  fix: push the version there again; `adapterhub verify` lists damaged versions.")
        verify_bytes(data, digest, self.describe(digest))
        return data

    def open_blob(self, digest: str) -> BinaryIO:
        """A stream of the blob's bytes (the reader hashes them)."""
        with self._errors(f"reading blob {digest}"):
            resp = self._get(blob_key(digest))
        if resp is None:
            raise NotFoundError(f"blob {digest} is missing from {self.location}.\n  file: {self.describe(digest)}\n"
                                "  fix: push the version there again.")
        length = resp.get("ContentLength")
        return _CountingStream(resp["Body"], self.traffic, self._errors, None if length is None else int(length),
                               self.describe(digest))

    def _list(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
        if delimiter:
            kw["Delimiter"] = delimiter
        with self._errors(f"listing {prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                self.traffic.add(requests=1)
                yield page

    def list_blob_info(self) -> Iterator[BlobInfo]:
        start = len(self._k("blobs/sha256/"))
        for page in self._list("blobs/sha256/"):
            for o in page.get("Contents", []):
                rest = o["Key"][start:]
                if len(rest) == 65 and rest[2] == "/":
                    yield BlobInfo(f"sha256:{rest[:2]}{rest[3:]}", int(o["Size"]), o["LastModified"].timestamp())

    def list_blobs(self) -> Iterator[str]:
        for info in self.list_blob_info():
            yield info.digest

    def delete_blob(self, digest: str) -> None:
        with self._errors(f"removing blob {digest}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._k(blob_key(digest)))

    # --- leftovers: pending multipart uploads -------------------------------------------------------

    def leftovers(self, grace: float) -> list[Leftover]:
        """Multipart uploads pending for longer than ``grace`` seconds (a push that was interrupted and
        never re-run); a re-run of the push resumes the newest one instead."""
        out = []
        now = datetime.now(UTC).timestamp()
        with self._errors("listing pending uploads"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=self._k("blobs/")):
                for u in page.get("Uploads", []):
                    if now - u["Initiated"].timestamp() >= grace:
                        size = 0
                        try:
                            for pp in self.client.get_paginator("list_parts").paginate(
                                    Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]):
                                size += sum(int(p["Size"]) for p in pp.get("Parts", []))
                        except self._ClientError:
                            continue
                        out.append(Leftover("upload", f"s3://{self.bucket}/{u['Key']} (upload {u['UploadId'][:12]})",
                                            size, (u["Key"], u["UploadId"], u["Initiated"].timestamp()),
                                            "a multipart upload of an interrupted push; re-running the push resumes "
                                            "it, `adapterhub gc` aborts it once older than the grace period"))
        return out

    def remove_leftover(self, item: Leftover, grace: float) -> int:
        key, upload_id, initiated = item.handle  # type: ignore[misc]
        if datetime.now(UTC).timestamp() - initiated < grace:
            return -1
        with self._errors("aborting a pending upload"):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except self._ClientError as e:
                if self._code(e)[0] == "NoSuchUpload":
                    return -1
                raise
        return item.size

    # --- documents ----------------------------------------------------------------------------------

    def read_doc_token(self, key: str) -> tuple[str, str] | None:
        with self._errors(f"reading {key}"):
            resp = self._get(key)
            if resp is None:
                return None
            data = resp["Body"].read()
        return data.decode("utf-8"), resp["ETag"]

    def read_doc(self, key: str) -> str | None:
        got = self.read_doc_token(key)
        return None if got is None else got[0]

    def _put_doc(self, key: str, text: str, **cond: str) -> bool:
        with self._errors(f"writing {key}"):
            try:
                self.traffic.add(requests=1)
                self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=text.encode("utf-8"), **cond)
            except self._ClientError as e:
                if cond and (self._precondition(e) or (self._missing(e) and "IfMatch" in cond)):
                    return False
                raise
        return True

    def create_doc(self, key: str, text: str) -> bool:
        """Create a document only if absent (``If-None-Match: *``); False when it exists."""
        return self._put_doc(key, text, IfNoneMatch="*")

    def swap_doc(self, key: str, text: str, token: str) -> bool:
        """Replace a document only if its ETag is still ``token`` (``If-Match``); False otherwise."""
        return self._put_doc(key, text, IfMatch=token)

    def replace_doc(self, key: str, text: str) -> None:
        self._put_doc(key, text)

    def delete_doc(self, key: str) -> None:
        with self._errors(f"removing {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def list_docs(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (documents and sub-prefixes), sorted."""
        base = self._k(prefix.rstrip("/") + "/")
        out = set()
        for page in self._list(prefix.rstrip("/") + "/", delimiter="/"):
            out.update(c["Prefix"][len(base):].rstrip("/") for c in page.get("CommonPrefixes", []))
            out.update(o["Key"][len(base):] for o in page.get("Contents", []))
        return sorted(n for n in out if n and not n.startswith("."))

    def walk_docs(self, prefix: str) -> list[str]:
        """Every document key below ``prefix``, relative to the registry's prefix, sorted."""
        out = []
        for page in self._list(prefix.rstrip("/") + "/"):
            out += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
        return sorted(out)


class _CountingStream:
    """A GetObject body that counts received bytes, translates network failures and refuses a body that
    ends before its Content-Length (a dropped connection is a network error, not a damaged blob).

    ``readinto`` reads straight from the HTTP response into the caller's buffer when botocore's body
    exposes it (urllib3's own ``readinto`` allocates and copies every chunk once more)."""

    def __init__(self, body: Any, traffic: Traffic, errors: Callable[[str], Any], length: int | None = None,
                 where: str = "a blob") -> None:
        self.body = body
        self.traffic = traffic
        self.errors = errors
        self.length = length
        self.where = where
        self.received = 0
        raw = getattr(body, "_raw_stream", None)  # urllib3's response
        fp = getattr(raw, "_fp", None)  # the http.client response under it
        plain = raw is not None and not (getattr(raw, "headers", None) or {}).get("content-encoding")
        self._raw = raw if plain and hasattr(fp, "readinto") and hasattr(raw, "release_conn") else None
        self._fp = fp if self._raw is not None else None

    def _count(self, n: int, want: int) -> None:
        self.received += n
        self.traffic.add(received=n)
        if n == 0 and want > 0 and self.length is not None and self.received < self.length:
            raise StorageError(f"the connection closed after {self.received} of {self.length} bytes of {self.where}.\n"
                              "  fix: check the server and the network, then retry (what arrived was not stored).")

    def read(self, n: int = -1) -> bytes:
        with self.errors("downloading a blob"):
            chunk = self.body.read(n if n and n > 0 else None)
        self._count(len(chunk), n if n and n > 0 else 1)
        return chunk

    def readinto(self, b: Any) -> int:
        with self.errors("downloading a blob"):
            if self._fp is not None:
                got = self._fp.readinto(b) or 0
                if not got and self._fp.isclosed():
                    self._raw.release_conn()  # read to its end: the connection goes back to the pool
            else:
                got = self.body.readinto(b) or 0
        self._count(got, len(b))
        return got

    def close(self) -> None:
        self.body.close()


def _read_exact(reader: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the stream)."""
    chunks, got = [], 0
    while got < n:
        chunk = reader.read(min(n - got, max(CHUNK, n - got)))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
