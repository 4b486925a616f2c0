"""Subprocess side of the remote tests (tests/test_store_contract.py, tests/test_remotes*.py).

Every line is flushed at once, so a parent that kills the worker with SIGKILL still reads all it said.
The S3 endpoint comes from ``--endpoint-url`` style argument ENDPOINT (``-`` for none); credentials from
the environment.

Modes:
    create URL ENDPOINT KEY TEXT GO_FILE
        Open the store, print ``READY``, wait for GO_FILE, create-if-absent KEY with TEXT; print ``WON`` or
        ``LOST``.
    publish URL ENDPOINT SRC NAME N GO_FILE
        Open the registry at URL, print ``READY``, wait for GO_FILE, push SRC to NAME N times (each a new
        version: allow_duplicate), printing ``DONE name@version sha256:...`` after each.
    copy SRC_URL DST_URL ENDPOINT REF PART_SIZE
        Copy REF from SRC to DST (S3 part size PART_SIZE bytes on both), printing ``START`` first,
        ``BYTES n`` for each chunk moved and ``COPIED`` at the end; the parent kills it in the middle.
        ``ADAPTERHUB_TEST_SLOW_PROGRESS=S`` sleeps S seconds after each chunk of 1 MiB or more.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from registry_worker import say, wait_for  # tests/registry_worker.py, the local registry's worker


def main() -> None:
    from adapterhub.registry.remotes import open_registry, open_store, parse_location

    mode, *args = sys.argv[1:]
    if mode == "create":
        url, endpoint, key, text, go = args
        store = open_store(parse_location(url, None if endpoint == "-" else endpoint))
        say("READY")
        wait_for(Path(go))
        say("WON" if store.create_doc(key, text) else "LOST")
    elif mode == "publish":
        url, endpoint, src, name, n, go = args
        reg = open_registry(url, endpoint_url=None if endpoint == "-" else endpoint)
        say("READY")
        wait_for(Path(go))
        for _ in range(int(n)):
            r = reg.push(src, name, allow_duplicate=True)
            say("DONE", r.ref, r.digest)
    elif mode == "copy":
        src_url, dst_url, endpoint, ref, part = args
        from adapterhub.registry.remotes.sync import copy_versions

        opts = {"part_size": int(part), "multipart_threshold": int(part)}
        ep = None if endpoint == "-" else endpoint
        src = open_registry(src_url, endpoint_url=ep, **(opts if src_url.startswith("s3://") else {}))
        dst = open_registry(dst_url, endpoint_url=ep, **(opts if dst_url.startswith("s3://") else {}))
        slow = float(os.environ.get("ADAPTERHUB_TEST_SLOW_PROGRESS", "0"))

        def progress(n: int) -> None:
            say("BYTES", n)
            if n >= 1024 * 1024:
                time.sleep(slow)  # a slow network: the parent kills us while this part's successor waits

        say("START")
        copy_versions(src, dst, [src.resolve(ref)], workers=2, progress=progress)
        say("COPIED")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
