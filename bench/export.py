"""Merged-checkpoint export against the disk's physical floor, a plain copy and PEFT's route.

Builds a synthetic Llama-shaped bf16 checkpoint (>= 3B parameters, sharded into ~3 GB files) and
three rank-16 LoRAs on every linear module, then runs these routes in one process each, interleaved
over --repeat rounds (the order rotates every round; disk throughput on a shared VM swings 2x from
minute to minute), with the page cache dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, or
``posix_fadvise`` when not root) before every run:

  cp -r             `cp -r` of the base (no fsync: the page cache absorbs the writes)
  cp -r + sync      the same, then every copied file fsynced (`sync FILE...`): a durable copy
  direct read       every base shard read with O_DIRECT (bench/diskfloor.py): the disk's read floor
  direct write      files of the output's sizes written with O_DIRECT and fsynced: the write floor
  direct copy       reader and writer threads, O_DIRECT, no compute: the floor of a streamed copy
  ours              `adapterhub export A B C --base BASE -o OUT` (fsyncs every file it writes)
  peft (once)       from_pretrained -> PeftModel.from_pretrained + merge_and_unload (x3) -> save_pretrained

The table gives each route's median wall time, every run, CPU time and peak RSS, and ours against
each anchor; the overlapped physical floor is max(direct read, direct write). Goals: ours <= 1.15x
that floor and <= 1.0x `cp -r` + sync; peak RSS <= largest shard + 1 GB.

--profile runs ours once more under `perf record` and splits its CPU time by where the samples fall:
GEMM (the fold's addmm), the finiteness check, dtype conversion (bf16 <-> f32 copies), kernel (I/O
syscalls, page faults, scheduling), user-space byte copies (staging memmove), OpenMP waiting, the
Python interpreter and the rest. --hash prints the sha256 of every output shard's tensor bytes (the
header holds the export time, so it differs run to run), to compare outputs before and after a change.

    .venv/bin/python bench/export.py [--work DIR] [--small] [--repeat N] [--skip-peft] [--profile] [--hash]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

FULL = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
            num_key_value_heads=24, vocab_size=32000)
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def make_base(path: Path, cfg: dict, shard_bytes: int) -> tuple[int, int]:
    """Write the bf16 checkpoint shard by shard (one shard in RAM at a time); returns (params, largest shard)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(16 * 1024 * 1024, generator=g) * 0.02).to(torch.bfloat16)  # tiled: fast to make
    groups, cur, size = [], [], 0
    for name, shp in shapes(cfg).items():
        n = math.prod(shp) * 2
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += n
    groups.append(cur)
    weight_map, total, largest, params = {}, 0, 0, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for j, (name, shp) in enumerate(group):
            numel = math.prod(shp)
            reps = math.ceil(numel / block.numel())
            t = block.roll(j * 7919 + k).repeat(reps)[:numel].reshape(shp).clone()
            if len(shp) == 1:
                t.fill_(1.0)
            tensors[name] = t
            weight_map[name] = fname
            params += numel
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        sz = (path / fname).stat().st_size
        total += sz
        largest = max(largest, sz)
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False, **cfg}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return params, largest


def make_loras(root: Path, cfg: dict, n: int = 3, r: int = 16) -> list[Path]:
    import torch

    from adapterhub.adapter import Adapter, LoraSpec, Tensors
    from adapterhub.formats import write_adapter

    dirs = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        tensors = {}
        for name, shp in shapes(cfg).items():
            mod = name[: -len(".weight")]
            if mod.rsplit(".", 1)[-1] in LINEAR:
                tensors[f"{mod}.lora_A"] = torch.randn(r, shp[1], generator=g) * 0.01
                tensors[f"{mod}.lora_B"] = torch.randn(shp[0], r, generator=g) * 0.01
        adapter = Adapter(kind="lora", spec=LoraSpec(r=r, alpha=2 * r, target_modules=LINEAR),
                          tensors=Tensors(tensors))
        dirs.append(write_adapter(adapter, root / f"lora{k}", format="peft"))
    return dirs


def drop_cache(*paths: Path) -> str:
    """Write back dirty pages and evict every file from the page cache: the whole cache when root
    (``drop_caches``), else ``posix_fadvise(DONTNEED)`` per file. Returns how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return "fadvise"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system), peak RSS (GiB) and stdout of a child process. Peak
    RSS is its VmHWM, polled from /proc while it runs (rusage's ru_maxrss would include this driver's
    own memory, inherited across fork)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak_kib = 0
    status_file = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}): {err[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, peak_kib / 1024 / 1024, out


PEFT_ROUTE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, out, *loras = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
for i, d in enumerate(loras):
    model = PeftModel.from_pretrained(model, d, adapter_name=f"a{i}").merge_and_unload()
model.save_pretrained(out, max_shard_size="5GB")
"""

#: perf sample -> CPU category: the first (dso or symbol) pattern that matches a sample's leaf wins
CATEGORIES = (
    ("OpenMP waiting", r"libgomp|gomp_|libiomp|kmp_"),
    ("GEMM (fold addmm)", r"libmkl|mkl_blas|sgemm|gemm|libopenblas"),
    ("finiteness check (aminmax)", r"aminmax|min_max|minmax"),
    ("dtype conversion (bf16 <-> f32 copy)", r"copy_kernel|BFloat16|bfloat16|convert|cast|copy_impl"),
    ("user byte copies (memmove/memcpy)", r"memmove|memcpy|__memcpy|__memmove"),
    ("kernel: I/O, page faults, scheduling", r"\[kernel"),
    ("Python interpreter", r"libpython|python3|_PyEval|PyObject"),
)


def profile_split(perf_data: Path) -> list[tuple[str, float, list[str]]]:
    """(category, share of samples, top symbols) from a `perf record` file, by each sample's leaf."""
    report = subprocess.run(["perf", "report", "-i", str(perf_data), "--stdio", "--no-children", "--sort",
                             "dso,sym", "-F", "overhead,dso,sym", "--percent-limit", "0"],
                            capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = {}
    tops: dict[str, list[str]] = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.kuA-Za-z]\]\s+(.*)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3).strip()
        what = f"{dso} {sym}"
        cat = next((name for name, pat in CATEGORIES if re.search(pat, what)), "rest")
        shares[cat] = shares.get(cat, 0.0) + pct
        if len(tops.setdefault(cat, [])) < 3 and pct >= 0.5:
            tops[cat].append(f"{sym[:60]} {pct:.1f}%")
    order = [name for name, _ in CATEGORIES] + ["rest"]
    return [(c, shares[c] / 100, tops.get(c, [])) for c in order if c in shares]


def data_hashes(out: Path) -> dict[str, str]:
    """sha256 of the tensor bytes (everything after the header) of every shard."""
    hashes = {}
    for f in sorted(out.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            fh.seek(8 + n)
            while chunk := fh.read(16 << 20):
                h.update(chunk)
        hashes[f.name] = h.hexdigest()
    return hashes


def prepare(work: Path, small: bool) -> dict:
    """The base checkpoint and LoRAs under ``work`` (made once, reused by later runs with --work)."""
    ready = work / "ready.json"
    if ready.is_file():
        info = json.loads(ready.read_text())
        if info.get("small") == small:
            return info
        raise SystemExit(f"{work} holds a {'small' if info.get('small') else 'full'} bench; use another --work")
    cfg = SMALL if small else FULL
    shutil.rmtree(work / "base", ignore_errors=True)
    t0 = time.perf_counter()
    params, largest = make_base(work / "base", cfg, (256 if small else 3000) * 1024 * 1024)
    loras = make_loras(work, cfg)
    info = {"small": small, "params": params, "largest": largest, "loras": [str(p) for p in loras],
            "setup_s": time.perf_counter() - t0}
    ready.write_text(json.dumps(info))
    return info


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="parent directory for a temporary work directory (default: system temp)")
    ap.add_argument("--work", help="work directory kept between runs: the base is built once and reused")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--small", action="store_true", help="a ~0.17B model instead of >= 3B (smoke run)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds of every route (median reported)")
    ap.add_argument("--only", default="", help="comma-separated routes to run (default all): "
                    "cp,cpsync,read,write,copy,ours")
    ap.add_argument("--profile", action="store_true", help="one more run of ours under `perf record`: CPU split")
    ap.add_argument("--hash", action="store_true", help="print the sha256 of ours' shards' tensor bytes")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for ours (A/B runs)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                    help="one more route per round: ours with the adapterhub package found in DIR (PYTHONPATH), "
                         "e.g. a `git archive` of an older commit: an interleaved A/B")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.dir))
    work.mkdir(parents=True, exist_ok=True)
    adapterhub_cli = str(Path(PY).with_name("adapterhub"))
    floor = str(ROOT / "bench" / "diskfloor.py")
    try:
        info = prepare(work, args.small)
        params, largest, loras = info["params"], info["largest"], info["loras"]
        base = work / "base"
        shards = sorted(base.glob("*.safetensors"))
        base_size = sum(f.stat().st_size for f in shards)
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count())}
        ours_env = {**env, **dict(kv.split("=", 1) for kv in args.env)}
        out = work / "out"
        routes = {
            "cp": ("`cp -r` (no fsync)", ["cp", "-r", str(base), str(out)], env),
            "cpsync": ("`cp -r` + `sync` of every copied file",
                       ["sh", "-c", 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} +', "sh", str(base),
                        str(out)], env),
            "read": ("direct-I/O read of the base (floor)", [PY, floor, "read", *map(str, shards)], env),
            "write": ("direct-I/O write of the same bytes + fsync (floor)",
                      [PY, floor, "write", *(str(f.stat().st_size) for f in shards), "--out", str(out)], env),
            "copy": ("direct-I/O copy, read and write threads overlapped (no compute)",
                     [PY, floor, "copy", *map(str, shards), "--out", str(out)], env),
            "ours": ("adapterhub export (fsyncs every file)",
                     [adapterhub_cli, "export", *loras, "--base", str(base), "-o", str(out), "--max-shard-size",
                      "5GB"], ours_env),
        }
        for spec in args.variant:
            tag, _, where = spec.partition("=")
            routes[f"ours[{tag}]"] = (f"adapterhub export, {tag} ({where})", routes["ours"][1],
                                      {**ours_env, "PYTHONPATH": str(Path(where).resolve())})
        chosen = [k for k in (args.only.split(",") if args.only else routes)]
        chosen += [k for k in routes if k.startswith("ours[") and k not in chosen]
        results: dict[str, list[tuple[float, float, float, str]]] = {}
        how = ""
        print(f"uptime at start: {load()}", file=sys.stderr, flush=True)
        for round_ in range(max(1, args.repeat)):
            order = chosen[round_ % len(chosen):] + chosen[: round_ % len(chosen)]
            for key in order:
                label, cmd, e = routes[key]
                shutil.rmtree(out, ignore_errors=True)
                how = drop_cache(base, *map(Path, loras))
                before = load()
                wall, cpu, rss, _ = timed(cmd, e)
                results.setdefault(key, []).append((wall, cpu, rss, before))
                print(f"  [{round_ + 1}] {label}: {wall:.2f} s, CPU {cpu:.1f} s (load {before})", file=sys.stderr,
                      flush=True)
                if key.startswith("ours") and args.hash and round_ == 0:
                    for name, digest in data_hashes(out).items():
                        print(f"  {key}: sha256 of {name}'s tensor bytes: {digest}", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if not args.skip_peft:
            how = drop_cache(base, *map(Path, loras))
            before = load()
            wall, cpu, rss, _ = timed([PY, "-c", PEFT_ROUTE, str(base), str(out), *loras], env)
            results["peft"] = [(wall, cpu, rss, before)]
            routes["peft"] = ("PEFT: from_pretrained + merge_and_unload x3 + save_pretrained", [], env)
            shutil.rmtree(out, ignore_errors=True)

        def med(key: str, k: int = 0) -> float:
            return statistics.median(r[k] for r in results[key])

        print(f"\n### Merged export: {params / 1e9:.2f}B-parameter bf16 Llama-shaped checkpoint, "
              f"{base_size / 2**30:.2f} GiB in {len(shards)} shards (largest {largest / 2**30:.2f} GiB), "
              f"3 x rank-16 LoRA on all linear modules; page cache dropped before every run ({how})\n")
        anchors = [k for k in ("cp", "cpsync") if k in results]
        floor_s = max(med("read"), med("write")) if "read" in results and "write" in results else None
        head = "| route | runs | wall (median) | all runs (load avg 1/5/15 min before each) | GiB/s | CPU | peak RSS |"
        cols = [f"vs {k}" for k in anchors] + (["vs floor"] if floor_s else [])
        print(head + "".join(f" {c} |" for c in cols))
        print("|---|---|---|---|---|---|---|" + "---|" * len(cols))
        for key, rows in results.items():
            wall = med(key)
            ratios = [f"{wall / med(k):.2f}x" for k in anchors] + ([f"{wall / floor_s:.2f}x"] if floor_s else [])
            print(f"| {routes[key][0]} | {len(rows)} | {wall:.2f} s | "
                  f"{', '.join(f'{r[0]:.1f} ({r[3]})' for r in rows)} | {base_size / wall / 2**30:.2f} | "
                  f"{med(key, 1):.1f} s | {max(r[2] for r in rows):.2f} GiB |" + "".join(f" {x} |" for x in ratios))
        if floor_s:
            print(f"\nphysical floor (read and write overlapped) = max(direct read {med('read'):.2f} s, "
                  f"direct write {med('write'):.2f} s) = {floor_s:.2f} s")
        if "ours" in results:
            ours_wall, ours_rss = med("ours"), max(r[2] for r in results["ours"])
            goals = [f"peak RSS {ours_rss:.2f} GiB <= largest shard + 1 GB = {(largest + 2**30) / 2**30:.2f} GiB: "
                     f"{'met' if ours_rss * 2**30 <= largest + 2**30 else 'NOT met'}"]
            if floor_s:
                goals.append(f"wall <= 1.15x floor: {'met' if ours_wall <= 1.15 * floor_s else 'NOT met'} "
                             f"({ours_wall / floor_s:.2f}x)")
            if "cpsync" in results:
                goals.append(f"wall <= 1.0x `cp -r` + sync: {'met' if ours_wall <= med('cpsync') else 'NOT met'} "
                             f"({ours_wall / med('cpsync'):.2f}x)")
            print("goals (medians): " + "; ".join(goals))
        if args.profile:
            for key in [k for k in routes if k == "ours" or k.startswith("ours[")]:
                shutil.rmtree(out, ignore_errors=True)
                drop_cache(base, *map(Path, loras))
                data = work / "perf.data"
                label, cmd, e = routes[key]
                before = load()
                wall, cpu, _, _ = timed(["perf", "record", "-q", "-F", "499", "-o", str(data), "--", *cmd], e)
                shutil.rmtree(out, ignore_errors=True)
                print(f"\nCPU split of {label} under `perf record -F 499` (one run: {wall:.1f} s wall, {cpu:.1f} s "
                      f"CPU, load {before}; leaf of each sample)\n")
                print("| where | share | CPU s | top symbols |")
                print("|---|---|---|---|")
                for cat, share, tops in profile_split(data):
                    print(f"| {cat} | {share:.1%} | {share * cpu:.1f} | {'; '.join(tops)} |")
                data.unlink()
        print(f"\nsetup (untimed): {info['setup_s']:.0f} s; {os.cpu_count()} cores; uptime at the end: {load()}")
    finally:
        shutil.rmtree(work / "out", ignore_errors=True)
        if args.work or args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
