"""Subprocess side of the registry's crash and concurrency tests (tests/test_registry.py).

Run with ``sys.executable``; every line it prints is flushed at once so that a parent that kills it
with SIGKILL still reads everything the worker said before dying.

Modes:
    push-loop REGISTRY TEMPLATE WORKDIR SEED NAME...
        Copy the adapter directory TEMPLATE to WORKDIR/src (once), print ``READY``, then push forever:
        pick a name, every other push change a few bytes of the weights (so that some pushes store a
        new blob and others deduplicate), print ``START name``, push, print
        ``DONE name@version sha256:...``. Only ever stopped by SIGKILL.
    race REGISTRY SRC GO_FILE PROC N NAME [same]
        Open the registry, print ``READY``, wait for GO_FILE to exist, then push SRC to NAME N times
        (description ``PROC-i``), printing ``DONE name@version sha256:... PROC i`` after each. Every
        push makes a new version (``allow_duplicate``), unless ``same`` is given: then identical
        content is not pushed twice.
    gc-loop REGISTRY GO_FILE STOP_FILE
        After GO_FILE exists, run ``gc()`` (default grace for staging files) until STOP_FILE exists;
        print ``GC n`` with the number of runs. Any exception exits non-zero.
    op REGISTRY METHOD ARG...
        Open a fresh Registry and call one method (``tag``, ``untag``, ``rm``, ``list``); print ``OK``.
    init-race BASE PROCS ROUNDS
        Fork PROCS processes (this script imports no torch and starts no threads, so fork is safe)
        that in each of ROUNDS rounds meet at a barrier and then all open the fresh registry
        BASE/r<round>; print one ``ERROR ...`` line per failed open, then ``OPENS n``.
    failed-push-then-tag REGISTRY SRC NAME REF TAG
        In one process: a push of SRC to NAME that must fail with StorageError (the parent made the
        refs unwritable), then ``tag(REF, TAG)``; print ``STORAGE_ERROR`` then ``TAGGED``.
    hold-staging REGISTRY NBYTES
        Write NBYTES to a staging file of the registry the way a push does (``tmp/<token>.blob-...``),
        print ``STAGING <path>``, then sleep until killed: a push in flight, frozen.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import sys
import time
from pathlib import Path

from adapterhub.errors import StorageError
from adapterhub.registry import Registry


def say(*parts: object) -> None:
    print(*parts, flush=True)


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.001)


def weights_file(src: Path) -> tuple[Path, int, int]:
    """The adapter's largest .safetensors file, the offset of its data and the data's length."""
    st = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    with open(st, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    start = 8 + header_len
    return st, start, st.stat().st_size - start


def push_loop(registry: str, template: str, workdir: str, seed: int, names: list[str]) -> None:
    src = Path(workdir) / "src"
    if not src.is_dir():
        tmp = Path(workdir) / f"src-{os.getpid()}.tmp"
        shutil.copytree(template, tmp)
        os.replace(tmp, src)
    st, start, length = weights_file(src)
    rng = random.Random(seed)
    reg = Registry(registry)
    say("READY")
    i = 0
    while True:
        name = names[rng.randrange(len(names))]
        if i % 2 == 0:  # new content: a new blob; the odd pushes deduplicate against it
            with open(st, "r+b") as f:
                f.seek(start + 4 * rng.randrange(length // 4))
                f.write(struct.pack("<f", rng.uniform(-1.0, 1.0)))
        say(f"START {name}")
        res = reg.push(src, name, description=f"seed {seed} push {i}", allow_duplicate=True)
        say(f"DONE {res.name}@{res.version} {res.digest}")
        i += 1


def race(registry: str, src: str, go: str, proc: str, n: int, name: str, same: bool = False) -> None:
    reg = Registry(registry)
    say("READY")
    wait_for(Path(go))
    for i in range(n):
        res = reg.push(src, name, description=f"{proc}-{i}", allow_duplicate=not same)
        say(f"DONE {res.name}@{res.version} {res.digest} {proc} {i}")


def gc_loop(registry: str, go: str, stop: str) -> None:
    reg = Registry(registry)
    say("READY")
    wait_for(Path(go))
    runs = 0
    while not Path(stop).exists():
        reg.gc()
        runs += 1
    say(f"GC {runs}")


def op(registry: str, method: str, args: list[str]) -> None:
    result = getattr(Registry(registry), method)(*args)
    say("OK", result)


def _open_in_rounds(barrier, base: Path, rounds: int, queue) -> None:
    errors = []
    for k in range(rounds):
        barrier.wait()
        try:
            Registry(base / f"r{k}")
        except Exception as e:  # reported to the parent
            errors.append(f"round {k}: {type(e).__name__}: {str(e).splitlines()[0]}")
    queue.put(errors)


def init_race(base: str, procs: int, rounds: int) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    children = [ctx.Process(target=_open_in_rounds, args=(barrier, Path(base), rounds, queue))
                for _ in range(procs)]
    for c in children:
        c.start()
    errors = [e for _ in children for e in queue.get(timeout=120)]
    for c in children:
        c.join(timeout=30)
    for e in errors:
        say("ERROR", e)
    say(f"OPENS {procs * rounds}")


def failed_push_then_tag(registry: str, src: str, name: str, ref: str, tag: str) -> None:
    reg = Registry(registry)
    try:
        reg.push(src, name)
    except StorageError:
        say("STORAGE_ERROR")
    else:
        say("PUSH_SUCCEEDED")
        sys.exit(3)
    reg.tag(ref, tag)
    say("TAGGED")


def hold_staging(registry: str, nbytes: int) -> None:
    reg = Registry(registry)
    fd, path = reg.store._temp()
    os.write(fd, b"\0" * nbytes)
    say(f"STAGING {path}")
    while True:
        time.sleep(60)


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "push-loop":
        push_loop(args[0], args[1], args[2], int(args[3]), args[4:])
    elif mode == "race":
        race(args[0], args[1], args[2], args[3], int(args[4]), args[5], args[6:] == ["same"])
    elif mode == "gc-loop":
        gc_loop(*args)
    elif mode == "op":
        op(args[0], args[1], args[2:])
    elif mode == "init-race":
        init_race(args[0], int(args[1]), int(args[2]))
    elif mode == "failed-push-then-tag":
        failed_push_then_tag(*args)
    elif mode == "hold-staging":
        hold_staging(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
