"""Benchmark the adapter registry: push/pull against ``cp -r``, list/resolve at 10,000 versions, dedup storage.

Three measurements, all from one run, printed as one markdown table:

1. Push and pull (copy and hard-link mode) of realistic LoRA adapters against ``cp -r`` of the same
   directory: rank-16 on every linear module of Llama-2-7B (q/k/v/o 4096x4096, gate/up 11008x4096,
   down 4096x11008, 32 layers, bf16: 40M parameters, ~80 MB) and rank-64 on Llama-3-8B (GQA k/v,
   14336 MLP: 168M parameters, ~336 MB; skipped by ``--quick``). Page cache warm: every source
   file was read just before, and ``os.sync()`` runs (untimed) before each timed operation so
   earlier writeback does not leak into it.
2. ``list`` / ``resolve`` latency at 10,000 versions (1,000 names in 10 namespaces, 10 versions
   each, every one a real ``push()`` of a tiny adapter whose bytes differ), each call on a new
   ``Registry`` object, plus the time the 10,000 pushes took.
3. Bytes on disk when 100 versions share most files: only README.md differs, or the weights change
   every 10th version, against 100 plain copies.

Usage:
    .venv/bin/python bench/registry.py [--quick] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from adapterhub.adapter import Adapter, IA3Spec, LoraSpec, Tensors
from adapterhub.formats import write_adapter
from adapterhub.registry import Registry
from adapterhub.registry.store import hash_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
README = "---\nlibrary_name: peft\nbase_model: {base}\n---\n\n# {title}\n\nrank-{r} LoRA on every linear module.\n"


# --- adapters -------------------------------------------------------------------------------------------


def llama_shapes(hidden: int, inter: int, kv_dim: int) -> dict[str, tuple[int, int]]:
    """module -> (out_features, in_features) of a Llama decoder layer's linear modules."""
    return {"q_proj": (hidden, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def llama_lora(r: int, layers: int, shapes: dict[str, tuple[int, int]], seed: int = 0) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for mod, (out_f, in_f) in shapes.items():
            group = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            p = f"model.layers.{i}.{group}.{mod}"
            tensors[p + ".lora_A"] = torch.randn(r, in_f, generator=gen).to(torch.bfloat16)
            tensors[p + ".lora_B"] = torch.randn(out_f, r, generator=gen).to(torch.bfloat16)
    return Adapter(kind="lora", spec=LoraSpec(r=r, alpha=2 * r, target_modules=LINEAR), tensors=Tensors(tensors))


def write_dir(adapter: Adapter, path: Path, base: str, title: str) -> Path:
    write_adapter(adapter, path, format="peft")
    r = adapter.spec.r if isinstance(adapter.spec, LoraSpec) else 0
    (path / "README.md").write_text(README.format(base=base, title=title, r=r))
    return path


def data_offset(safetensors_file: Path) -> int:
    with open(safetensors_file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def poke(safetensors_file: Path, value: int, at: int = 0) -> None:
    """Overwrite 4 bytes of tensor data (so the file's hash changes, the header does not)."""
    fd = os.open(safetensors_file, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack("<I", value & 0xFFFFFFFF), data_offset(safetensors_file) + at)
    finally:
        os.close(fd)


# --- measuring ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ms(s: float) -> str:
    if s < 0.001:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def du(path: Path) -> int:
    """Bytes allocated on disk below ``path`` (``du -s -B1``; hard links counted once)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """os.fsync does nothing inside (bench-only A/B of what the durable output of a pull costs)."""
    from adapterhub.formats import _files

    real = _files.os.fsync
    _files.os.fsync = lambda fd: None
    try:
        yield
    finally:
        _files.os.fsync = real


def cp_r(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", "-P", str(path)], check=True, capture_output=True, text=True).stdout
        fields = out.splitlines()[1].split()
        return f"{fields[1]} ({fields[0]}, {human(int(fields[4]) * 1024)} free)"
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return "unknown"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"  {what}: {value}" + (f"  ({note})" if note else ""), flush=True)

    def section(self, title: str) -> None:
        self.rows.append((f"**{title}**", "", ""))
        print(f"\n{title}", flush=True)

    def render(self) -> str:
        lines = ["| measure | value | note |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines)


# --- 1. push / pull vs cp -r ----------------------------------------------------------------------------


def bench_transfer(table: Table, work: Path, label: str, adapter: Adapter, base: str, repeat: int) -> None:
    src = write_dir(adapter, work / f"src-{label}", base, label)
    weights = src / "adapter_model.safetensors"
    size = dir_size(src)
    reg = Registry(work / f"reg-{label}")
    name = f"bench/{label}"
    out = work / f"out-{label}"
    out.mkdir()
    table.section(f"1. push / pull vs `cp -r`: {label} ({human(size)} directory, "
                  f"{adapter.num_parameters / 1e6:.1f}M params, median of {repeat}, page cache warm)")

    cp, cp_sync, push_new, push_same, pull_copy, pull_verify, pull_link, sha = ([] for _ in range(8))
    pull_nosync = []
    push_trust_all, push_rehash = [], []
    n = 0

    def fresh(tag: str) -> Path:
        nonlocal n
        n += 1
        return out / f"{tag}-{n}"

    # warm-up (untimed): page cache holds the source, the registry exists, code paths are imported
    reg.push(src, name)
    reg.pull(name, fresh("warm"))
    cp_r(src, fresh("warm"))
    for i in range(repeat):
        os.sync()
        d = fresh("cp")
        cp.append(timed(lambda d=d: cp_r(src, d)))
        os.sync()
        d = fresh("cps")
        cp_sync.append(timed(lambda d=d: (cp_r(src, d), fsync_tree(d))))
        poke(weights, 1000 + i)  # new weights: a new blob
        hash_file(weights)  # re-read so the page cache is warm
        os.sync()
        push_new.append(timed(lambda: reg.push(src, name)))
        os.sync()
        # same bytes: blobs deduplicated (a new version all the same: the duplicate check is not what is timed)
        push_same.append(timed(lambda: reg.push(src, name, allow_duplicate=True)))
        # A/B of the stat-stamp check, interleaved: trusting every existing blob by its name (what push
        # did before it re-hashed doubted blobs), and a push after every blob's stamp changed (chmod)
        reg._blob_trusted = lambda digest: True
        os.sync()
        push_trust_all.append(timed(lambda: reg.push(src, name, allow_duplicate=True)))
        del reg._blob_trusted
        for f in reg.manifest(name)["files"]:
            os.chmod(reg.store.blob_path("sha256:" + f["sha256"]), 0o444)  # ctime changes: the stamp no longer matches
        os.sync()
        push_rehash.append(timed(lambda: reg.push(src, name, allow_duplicate=True)))
        os.sync()
        d = fresh("pull")
        pull_copy.append(timed(lambda d=d: reg.pull(name, d)))
        os.sync()
        d = fresh("verify")
        pull_verify.append(timed(lambda d=d: reg.pull(name, d, verify=True)))
        os.sync()
        d = fresh("nosync")
        with no_fsync():  # A/B: what the output's fsync costs (pull fsyncs every file before renaming it in)
            pull_nosync.append(timed(lambda d=d: reg.pull(name, d)))
        os.sync()
        d = fresh("link")
        pull_link.append(timed(lambda d=d: reg.pull(name, d, link=True)))
        sha.append(timed(lambda: hash_file(weights)))
        for p in out.iterdir():  # keep the disk footprint small (untimed)
            shutil.rmtree(p)
    reg.close()
    weights_size = weights.stat().st_size
    shutil.rmtree(reg.root)  # keep the peak disk use low (untimed)
    shutil.rmtree(src)
    c = median(cp)
    table.add("`cp -r` (subprocess)", ms(c), f"min {ms(min(cp))}; no fsync")
    table.add("`cp -r` + fsync of each file", ms(median(cp_sync)), "what a durable copy costs here")
    table.add("push, new weights", ms(median(push_new)), f"{size / median(push_new) / 1e6:.0f} MB/s; "
              f"{median(push_new) / c:.2f}x cp")
    table.add("push, unchanged (blobs deduplicated)", ms(median(push_same)), f"{median(push_same) / c:.2f}x cp; "
              "existing blobs trusted by their unchanged stat stamp")
    table.add("  same, every existing blob trusted by name", ms(median(push_trust_all)),
              f"A/B: the stamp check costs {ms(median(push_same) - median(push_trust_all))} per push")
    table.add("  same, every blob's stamp changed (re-hashed)", ms(median(push_rehash)),
              f"{median(push_rehash) / median(push_same):.2f}x the trusted push")
    table.add("pull (copy)", ms(median(pull_copy)), f"**{median(pull_copy) / c:.2f}x cp** (goal <= 1.2x); "
              f"{median(pull_copy) / median(cp_sync):.2f}x cp+fsync; unchanged stamps trusted, files fsynced")
    table.add("  same, without the fsync of the output (A/B)", ms(median(pull_nosync)),
              f"**{median(pull_nosync) / c:.2f}x cp**: the rest of the pull's cost is the fsync")
    table.add("pull (copy, `verify=True`)", ms(median(pull_verify)), f"{median(pull_verify) / c:.2f}x cp; "
              f"{median(pull_verify) / median(cp_sync):.2f}x cp+fsync; every byte re-hashed while copying")
    table.add("pull (link=True)", ms(median(pull_link)), f"**{median(pull_link) / c:.2f}x cp** (goal: O(1))")
    table.add("sha256 of adapter_model.safetensors alone", ms(median(sha)),
              f"{weights_size / median(sha) / 1e6:.0f} MB/s; what `verify=True` adds to a copy pull at most")


# --- 2. list / resolve at 10k versions ------------------------------------------------------------------


def tiny_dirs(work: Path) -> tuple[Path, Path]:
    lora = Adapter(kind="lora", spec=LoraSpec(r=1, alpha=2, target_modules=("q_proj",)), tensors=Tensors({
        "model.layers.0.self_attn.q_proj.lora_A": torch.zeros(1, 64),
        "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(64, 1)}))
    ia3 = Adapter(kind="ia3", spec=IA3Spec(target_modules=("down_proj",), feedforward_modules=("down_proj",)),
                  tensors=Tensors({"model.layers.0.mlp.down_proj.ia3_l": torch.ones(1, 64)}))
    return write_adapter(lora, work / "tiny-lora", format="peft"), write_adapter(ia3, work / "tiny-ia3", format="peft")


def bench_many(table: Table, work: Path, namespaces: int, names: int, versions: int, budget: float) -> None:
    lora_dir, ia3_dir = tiny_dirs(work)
    root = work / "reg-many"
    reg = Registry(root)
    target = namespaces * names * versions
    table.section(f"2. list / resolve at {target:,} versions ({namespaces} namespaces x {names} names x "
                  f"{versions} versions; every 10th name IA3, the rest LoRA; tag `prod` on version "
                  f"{versions // 2 + 1} of each name)")
    per_push: list[float] = []
    pushed = 0
    t0 = time.perf_counter()
    stopped = False
    for v in range(1, versions + 1):
        for ns in range(namespaces):
            for k in range(names):
                src = ia3_dir if k % 10 == 9 else lora_dir
                poke(src / "adapter_model.safetensors", pushed)  # every version's weights differ
                tags = ["prod"] if v == versions // 2 + 1 else []
                t = time.perf_counter()
                reg.push(src, f"team-{ns}/n-{k:03d}", tags=tags, description=f"run {pushed}")
                per_push.append(time.perf_counter() - t)
                pushed += 1
            if time.perf_counter() - t0 > budget:
                stopped = True
                break
        if stopped:
            break
    total = time.perf_counter() - t0
    reg.close()
    chunk = max(1, len(per_push) // 10)
    first, last = per_push[:chunk], per_push[-chunk:]
    table.add(f"populate: {pushed:,} real `push()` calls", f"{total:.1f} s",
              f"{pushed / total:.0f} pushes/s; per push median {ms(median(first))} over the first {chunk:,}, "
              f"{ms(median(last))} over the last {chunk:,}; p99 {ms(sorted(per_push)[int(len(per_push) * .99)])}"
              + (f"; STOPPED at the {budget:.0f} s budget, short of {target:,}" if stopped else ""))
    with sqlite3.connect(root / "index.sqlite") as db:
        indexed = db.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
    table.add("versions in the index", f"{indexed:,}", f"registry on disk {human(du(root))}")

    def each(fn: Callable[[Registry], object], n: int = 10) -> tuple[float, object]:
        times, result = [], None
        for _ in range(n):
            t = time.perf_counter()
            r = Registry(root)
            result = fn(r)
            times.append(time.perf_counter() - t)
            r.close()
        return median(times), result

    t, _ = each(lambda r: r.root)
    table.add("`Registry(path)` alone", ms(t), "median of 10")
    t, rows = each(lambda r: r.list())
    table.add("`Registry(path).list()`", ms(t), f"{len(rows):,} rows; median of 10; goal < 50 ms")
    t, rows = each(lambda r: r.list("team-7/*"))
    table.add('`.list("team-7/*")`', ms(t), f"{len(rows):,} rows; median of 10")
    t, rows = each(lambda r: r.list(kind="lora", tag="prod"))
    table.add('`.list(kind="lora", tag="prod")`', ms(t), f"{len(rows):,} rows; median of 10")
    name = f"team-3/n-{42 % names:03d}"
    t, rows = each(lambda r: r.list(name))
    table.add(f'`.list("{name}")` (one name)', ms(t), f"{len(rows):,} rows; median of 10")
    for ref in (name, f"{name}@3", f"{name}@prod"):
        t, res = each(lambda r, ref=ref: r.resolve(ref))
        table.add(f'`.resolve("{ref}")`', ms(t), f"-> {res.ref}; median of 10, new Registry each")
    warm = Registry(root)
    ts = [timed(lambda: warm.resolve(f"{name}@prod")) for _ in range(100)]
    table.add("`.resolve(...@prod)` on one open Registry", ms(median(ts)), "median of 100")
    ts = [timed(lambda: warm.list()) for _ in range(5)]
    table.add("`.list()` on one open Registry", ms(median(ts)), "median of 5: query + VersionInfo building only")
    warm.close()
    env = {**os.environ, "ADAPTERHUB_REGISTRY": str(root)}
    exe = Path(sys.executable).with_name("adapterhub")
    if exe.exists():
        ts = [timed(lambda: subprocess.run([str(exe), "list", "team-7/*"], env=env, check=True,
                                           capture_output=True)) for _ in range(3)]
        table.add('CLI `adapterhub list "team-7/*"` (new process)', ms(median(ts)),
                  "median of 3; includes interpreter start and imports")
    r = Registry(root)
    t = timed(lambda: r.gc(dry_run=True))
    table.add("`.gc(dry_run=True)`", ms(t), "one run")
    t = timed(r.verify)
    table.add("`.verify()`", ms(t), "one run; hashes every blob")
    t = timed(r.reindex)
    table.add("`.reindex()`", ms(t), "one run")
    r.close()


# --- 3. storage with shared files -----------------------------------------------------------------------


def bench_storage(table: Table, work: Path, src: Path, n: int) -> None:
    size = dir_size(src)
    src_du = du(src)
    table.section(f"3. storage: {n} versions of a {human(size)} adapter directory "
                  "(adapter_model.safetensors + adapter_config.json + README.md)")
    weights = src / "adapter_model.safetensors"
    readme = (src / "README.md").read_text()
    for label, weights_every in (("only README.md differs", 0), ("weights change every 10th version", 10)):
        root = work / "reg-storage"
        reg = Registry(root)
        t0 = time.perf_counter()
        for i in range(n):
            (src / "README.md").write_text(readme + f"\nversion {i}\n")
            if weights_every and i % weights_every == 0:
                poke(weights, 5000 + i)
            reg.push(src, "team/shared", description=f"v{i}", allow_duplicate=True)
        t = time.perf_counter() - t0
        reg.close()
        blobs, whole = du(root / "blobs"), du(root)
        distinct = 1 + (n - 1) // weights_every if weights_every else 1
        table.add(f"{label}: blobs/ on disk", human(blobs),
                  f"{blobs / (n * src_du):.2%} of {n} copies ({human(n * src_du)}); ideal "
                  f"{distinct} x weights = {human(distinct * weights.stat().st_size)}; whole registry "
                  f"{human(whole)}; {n} pushes took {t:.1f} s ({ms(t / n)} each)")
        shutil.rmtree(root)
    (src / "README.md").write_text(readme)


# --- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller run: 7B only, 1,000 versions, 20 shared versions")
    ap.add_argument("--dir", type=Path, help="parent directory for the work files (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="do not delete the work directory at the end")
    ap.add_argument("--repeat", type=int, help="runs per push/pull measurement (default 7, --quick 3)")
    ap.add_argument("--populate-budget", type=float, default=180.0,
                    help="seconds allowed for pushing the many small versions before stopping short (default 180)")
    args = ap.parse_args()
    repeat = args.repeat or (3 if args.quick else 7)
    names = 10 if args.quick else 100

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="registry-bench-", dir=args.dir))
    table = Table()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    try:
        llama2 = llama_lora(16, 32, llama_shapes(4096, 11008, 4096))
        bench_transfer(table, work, "llama2-7b-r16", llama2, "meta-llama/Llama-2-7b-hf", repeat)
        if not args.quick:
            llama3 = llama_lora(64, 32, llama_shapes(4096, 14336, 1024), seed=1)
            bench_transfer(table, work, "llama3-8b-r64", llama3, "meta-llama/Meta-Llama-3-8B", max(3, repeat - 2))
            del llama3
        bench_many(table, work, 10, names, 10, args.populate_budget)
        shared = write_dir(llama2, work / "shared-src", "meta-llama/Llama-2-7b-hf", "shared")
        del llama2
        bench_storage(table, work, shared, 20 if args.quick else 100)
        elapsed = time.perf_counter() - t_start

        cpus = os.cpu_count()
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
        print()
        print(table.render())
        print()
        print(f"machine: {affinity} usable CPUs ({cpus} online), {platform.machine()}, Linux {platform.release()}; "
              f"python {platform.python_version()}, torch {torch.__version__}, sqlite {sqlite3.sqlite_version}; "
              f"work dir {work} on {filesystem(work)}; page cache warm for every timing; "
              f"whole run {elapsed:.0f} s{' (--quick)' if args.quick else ''}")
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
