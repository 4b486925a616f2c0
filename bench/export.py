"""Merged-checkpoint export: adapterhub's streamed export vs PEFT's route vs a plain copy.

Builds a synthetic Llama-shaped bf16 checkpoint (>= 3B parameters, sharded into ~2-5 GB files) and
three rank-16 LoRAs on every linear module, then in one run, each step in its own process with the
page cache of the inputs dropped before it:

  copy   `cp -r` of the base checkpoint (no fsync)
  ours   `adapterhub export A B C --base BASE -o OUT` (fsyncs every file it writes)
  peft   AutoModelForCausalLM.from_pretrained -> PeftModel.from_pretrained + merge_and_unload (x3)
         -> save_pretrained (the route that holds the whole model in RAM)

Copy and ours run --repeat times, interleaved (disk throughput on shared VMs swings 2x from minute
to minute), and the table gives their medians; PEFT runs once. It prints wall time, CPU time and
peak RSS of each. Goals: our peak RSS <= largest shard + 1 GB; our time <= 1.5x the plain copy.
Needs ~30 GB of free disk; not a test.

    .venv/bin/python bench/export.py [--dir DIR] [--keep] [--small] [--repeat N] [--skip-peft]
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


def drop_cache(*paths: Path) -> bool:
    """Evict files from the page cache (posix_fadvise DONTNEED per file); True if it worked."""
    ok = True
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:
                    ok = False
                finally:
                    os.close(fd)
    return ok


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GiB) of a child process: its VmHWM,
    polled from /proc while it runs (rusage's ru_maxrss would include this driver's own memory,
    inherited across fork)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
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
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, peak_kib / 1024 / 1024


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="parent directory for the work files (default: system temp)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--small", action="store_true", help="a ~0.3B model instead of >= 3B (smoke run)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of copy and ours (median reported)")
    args = ap.parse_args()
    cfg = SMALL if args.small else FULL
    shard = (256 if args.small else 3000) * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.dir))
    adapterhub_cli = str(Path(PY).with_name("adapterhub"))
    try:
        t0 = time.perf_counter()
        params, largest = make_base(work / "base", cfg, shard)
        loras = make_loras(work, cfg)
        setup = time.perf_counter() - t0
        base_size = sum(f.stat().st_size for f in (work / "base").iterdir())
        copy = ("plain copy (`cp -r`)", ["cp", "-r", str(work / "base"), str(work / "copy")], work / "copy")
        ours = ("adapterhub export", [adapterhub_cli, "export", *map(str, loras), "--base", str(work / "base"),
                                      "-o", str(work / "ours"), "--max-shard-size", "5GB"], work / "ours")
        peft = ("PEFT: from_pretrained + merge_and_unload x3 + save_pretrained",
                [PY, "-c", PEFT_ROUTE, str(work / "base"), str(work / "peft"), *map(str, loras)], work / "peft")
        runs = [copy, ours] * max(1, args.repeat) + ([] if args.skip_peft else [peft])
        results: dict[str, list[tuple[float, float, float, int, bool]]] = {}
        for label, cmd, out in runs:
            shutil.rmtree(out, ignore_errors=True)
            dropped = drop_cache(work / "base", *loras)
            wall, cpu, rss = timed(cmd, {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count())})
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            results.setdefault(label, []).append((wall, cpu, rss, size, dropped))
            print(f"  {label}: {wall:.1f} s", file=sys.stderr, flush=True)
        for _, _, out in (copy, peft):
            shutil.rmtree(out, ignore_errors=True)

        def median(label: str, k: int) -> float:
            return statistics.median(r[k] for r in results[label])

        copy_wall = median(copy[0], 0)
        print(f"\n### Merged export: {params / 1e9:.2f}B-parameter bf16 Llama-shaped checkpoint, "
              f"{base_size / 2**30:.2f} GiB in {len(list((work / 'base').glob('*.safetensors')))} shards "
              f"(largest {largest / 2**30:.2f} GiB), 3 x rank-16 LoRA on all linear modules\n")
        print("| route | runs | wall time (median) | all runs | vs copy | CPU time | peak RSS | output | "
              "page cache dropped |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, rows in results.items():
            wall = median(label, 0)
            print(f"| {label} | {len(rows)} | {wall:.1f} s | {', '.join(f'{r[0]:.1f}' for r in rows)} | "
                  f"{wall / copy_wall:.2f}x | {median(label, 1):.1f} s | {max(r[2] for r in rows):.2f} GiB | "
                  f"{rows[0][3] / 2**30:.2f} GiB | {'yes' if all(r[4] for r in rows) else 'no'} |")
        ours_wall, ours_rss = median(ours[0], 0), max(r[2] for r in results[ours[0]])
        print(f"\ngoals: peak RSS <= largest shard + 1 GB = {(largest + 2**30) / 2**30:.2f} GiB -> "
              f"{'met' if ours_rss * 2**30 <= largest + 2**30 else 'NOT met'}; time <= 1.5x copy -> "
              f"{'met' if ours_wall <= 1.5 * copy_wall else 'NOT met'} ({ours_wall / copy_wall:.2f}x, medians)")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"setup (writing the synthetic checkpoint and LoRAs, untimed): {setup:.0f} s; "
              f"{os.cpu_count()} cores; this driver's own peak RSS {own:.2f} GiB")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
