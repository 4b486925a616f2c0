"""LoRA extraction from a full fine-tune: `adapterhub extract` against `mergekit-extract-lora` (mergekit 0.1.5).

Builds a synthetic bf16 Llama-shaped pair (hidden 2048, intermediate 5632, 16 layers, 32 heads, vocabulary
32000: 0.95B parameters, two ~1 GB shards each): the fine-tune is the base plus, on every linear module,
a rank-16 change of 1% of the weight's norm and full-rank Gaussian noise of 0.1% (then rounded to bf16);
embeddings, LM head and norms are bit-identical. Then, each in its own process with the page cache dropped
before it (`sync; echo 3 > /proc/sys/vm/drop_caches`, else `posix_fadvise(DONTNEED)` on the inputs;
the table says which), at the same rank:

  ours      `adapterhub extract --base B --tuned T --rank 16 -o OUT`
  mergekit  `mergekit-extract-lora --model T --base-model B --out-path OUT --max-rank 16` (CPU)

in the order ours, mergekit, ours. Reported: wall time, CPU time (user + system), peak RSS (the child's
VmHWM), output bytes, tensors in the output that equal the base's, and per linear module the relative
error ||D - B A|| / ||D|| of each output's factors against the exact rank-16 truncation (Eckart-Young,
from a dense `svdvals` of D in float64 accumulation): max and mean of the ratio, and of the error itself.
Goals: ours >= 10x faster than mergekit, error <= 1.01x the optimum, peak RSS <= 1 GB, no unchanged tensors.

mergekit is installed by this script into `.venv-mergekit` (torch pinned by scripts/constraints.txt, so no
CUDA wheels are pulled) on first use. Needs ~8 GB of free disk under --dir; everything is deleted at the end
unless --keep. Not a test; run it alone:

    flock /tmp/adapterhub-bench.lock .venv/bin/python bench/extract.py [--dir DIR] [--keep] [--small]
        [--skip-mergekit] [--no-errors] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export import drop_cache, shapes, timed  # bench/export.py: the same Llama layout and timing

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MERGEKIT_VENV = ROOT / ".venv-mergekit"

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=8000)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    return name.rsplit(".", 2)[-2] in LINEAR


def make_pair(base: Path, tuned: Path, cfg: dict, shard_bytes: int, rank: int) -> int:
    """Write base and fine-tune shard by shard (one shard of each in RAM at a time); returns the parameters."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    groups, cur, size = [], [], 0
    for name, shp in shapes(cfg).items():
        n = math.prod(shp) * 2
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += n
    groups.append(cur)
    weight_map, params = {}, 0
    for d in (base, tuned):
        d.mkdir(parents=True)
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        b_tensors, t_tensors = {}, {}
        for name, shp in group:
            if len(shp) == 1:
                w = torch.ones(shp) + torch.randn(shp, generator=g) * 0.01
            else:
                w = torch.randn(shp, generator=g) * 0.02
            wb = w.to(torch.bfloat16)
            b_tensors[name] = wb
            if is_linear(name):
                w = wb.float()
                change = torch.randn(shp[0], rank, generator=g) @ torch.randn(rank, shp[1], generator=g)
                noise = torch.randn(shp, generator=g)
                norm = w.norm()
                w += change * (0.01 * norm / change.norm())
                w += noise * (0.001 * norm / noise.norm())
                t_tensors[name] = w.to(torch.bfloat16)
            else:
                t_tensors[name] = wb.clone()
            weight_map[name] = fname
            params += math.prod(shp)
        save_file(b_tensors, str(base / fname), metadata={"format": "pt"})
        save_file(t_tensors, str(tuned / fname), metadata={"format": "pt"})
        del b_tensors, t_tensors
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "hidden_act": "silu", **cfg}
    for d in (base, tuned):
        total = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return params


def ensure_mergekit() -> Path:
    """`.venv-mergekit/bin/mergekit-extract-lora`, installing mergekit 0.1.5 with the pinned CPU torch first."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-extract-lora"
    if exe.exists():
        return exe
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
           str(ROOT / "scripts" / "constraints.txt")]
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True, env=env)
    subprocess.run([*pip, "mergekit==0.1.5"], check=True, env=env)
    return exe


def factors(out: Path) -> dict[str, tuple]:
    """module -> (A, B, scale) of a PEFT LoRA directory, as PEFT applies it."""
    from adapterhub.formats import read_adapter

    a = read_adapter(out)
    return {m: (a.tensors[a.module_tensors(m)["lora_A"]].float(), a.tensors[a.module_tensors(m)["lora_B"]].float(),
                a.spec.scale(m)) for m in a.modules() if "lora_A" in a.module_tensors(m)}


def stored_unchanged(out: Path, base: Path) -> tuple[int, int]:
    """(tensors in the output that are copies equal to the base's, their bytes)."""
    import torch
    from safetensors import safe_open

    from adapterhub.base import BaseCheckpoint
    from adapterhub.tensorfile import load_tensor

    ckpt = BaseCheckpoint.open(base)
    n = nbytes = 0
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            name = key.removeprefix("base_model.model.")
            if name in ckpt.tensors:
                t = f.get_tensor(key)
                if torch.equal(t, load_tensor(ckpt.tensors[name], cached=False)):
                    n += 1
                    nbytes += t.numel() * t.element_size()
    return n, nbytes


def errors(base: Path, tuned: Path, outs: dict[str, Path], rank: int) -> dict[str, list[tuple[float, float]]]:
    """label -> per linear module (error, error / optimum)."""
    import torch

    from adapterhub.base import BaseCheckpoint
    from adapterhub.tensorfile import load_tensor

    b, t = BaseCheckpoint.open(base), BaseCheckpoint.open(tuned)
    fs = {label: factors(out) for label, out in outs.items()}
    res: dict[str, list[tuple[float, float]]] = {label: [] for label in outs}
    for name in b.tensors:
        if not is_linear(name):
            continue
        D = load_tensor(t.tensors[name], cached=False).float() - load_tensor(b.tensors[name], cached=False).float()
        s = torch.linalg.svdvals(D).double()
        total = float(s.square().sum())
        optimum = math.sqrt(float(s[rank:].square().sum()) / total)
        module = name.removesuffix(".weight")
        for label, f in fs.items():
            A, B, scale = f[module]
            err = float((D.double() - (B.double() @ A.double()) * scale).norm()) / math.sqrt(total)
            res[label].append((err, err / optimum))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="parent directory for the work files (default: system temp)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--small", action="store_true", help="a 0.1B pair instead of 0.95B (smoke run)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-errors", action="store_true",
                    help="skip the reference SVDs (half an hour on a busy 2-core machine); errors print as -")
    args = ap.parse_args()
    cfg = SMALL if args.small else FULL
    shard = (64 if args.small else 1000) * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="extract-bench-", dir=args.dir))
    ours_cli = str(Path(PY).with_name("adapterhub"))
    load = [os.getloadavg()]
    try:
        mergekit = None if args.skip_mergekit else ensure_mergekit()
        t0 = time.perf_counter()
        params = make_pair(work / "base", work / "tuned", cfg, shard, args.rank)
        setup = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (work / "tuned").glob("*.safetensors"))
        B, T = str(work / "base"), str(work / "tuned")
        ours = ("adapterhub extract", [ours_cli, "extract", "--base", B, "--tuned", T, "--rank", str(args.rank),
                                       "-o", str(work / "ours")], work / "ours")
        mk = ("mergekit-extract-lora", [str(mergekit), "--model", T, "--base-model", B, "--out-path",
                                        str(work / "mergekit"), "--max-rank", str(args.rank)], work / "mergekit")
        runs = [ours] + ([] if mergekit is None else [mk, ours])
        results: dict[str, list[tuple[float, float, float, str]]] = {}
        for label, cmd, out in runs:
            shutil.rmtree(out, ignore_errors=True)
            how = drop_cache(work / "base", work / "tuned")
            load.append(os.getloadavg())
            wall, cpu, rss, out = timed(cmd, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
            print(out.strip()[-1500:], file=sys.stderr)
            results.setdefault(label, []).append((wall, cpu, rss, how))
            print(f"  {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, {rss:.2f} GiB", file=sys.stderr, flush=True)
        load.append(os.getloadavg())
        outs = {label: out for label, _, out in (ours, mk) if out.exists()}
        t0 = time.perf_counter()
        errs = ({label: [(math.nan, math.nan)] for label in outs} if args.no_errors
                else errors(work / "base", work / "tuned", outs, args.rank))
        ref_time = time.perf_counter() - t0
        print(f"\n### LoRA extraction at rank {args.rank}: {params / 1e9:.2f}B-parameter bf16 Llama-shaped pair, "
              f"{size / 2**30:.2f} GiB per checkpoint in {len(list((work / 'base').glob('*.safetensors')))} shards; "
              f"{sum(1 for n in shapes(cfg) if is_linear(n))} linear modules changed (rank-16 change + noise), the "
              "rest bit-identical\n")
        print("| tool | run | wall | CPU | peak RSS | output | unchanged tensors stored | error / optimum max | "
              "mean | error max | mean | cache |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for label, rows in results.items():
            out = outs[label]
            nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            n_same, same_bytes = stored_unchanged(out, work / "base")
            e = errs[label]
            for i, (wall, cpu, rss, how) in enumerate(rows):
                print(f"| {label} | {i + 1} | {wall:.1f} s | {cpu:.1f} s | {rss:.2f} GiB | {nbytes / 1e6:.1f} MB | "
                      f"{n_same} ({same_bytes / 1e6:.0f} MB) | {max(r for _, r in e):.5f} | "
                      f"{sum(r for _, r in e) / len(e):.5f} | {max(x for x, _ in e):.4f} | "
                      f"{sum(x for x, _ in e) / len(e):.4f} | {how} |")
        o = results[ours[0]]
        best = min(r[0] for r in o)
        worst = max(r for _, r in errs[ours[0]])
        verdict = "not measured" if math.isnan(worst) else "met" if worst <= 1.01 else "NOT met"
        line = (f"\ngoals: error <= 1.01x optimum -> {verdict};"
                f" peak RSS <= 1 GB -> {'met' if max(r[2] for r in o) * 2**30 <= 1e9 else 'NOT met'}")
        if mk[0] in results:
            mk_wall = results[mk[0]][0][0]
            line += (f"; >= 10x faster than mergekit -> {mk_wall / max(r[0] for r in o):.1f}x (slowest of ours), "
                     f"{mk_wall / best:.1f}x (fastest): {'met' if mk_wall >= 10 * max(r[0] for r in o) else 'NOT met'}")
        print(line)
        print(f"load average (1/5/15 min) at start, before each run, at the end: "
              f"{'; '.join('/'.join(f'{x:.2f}' for x in la) for la in load)}")
        print(f"{os.cpu_count()} cores; setup (writing the pair, untimed) {setup:.0f} s; "
              f"reference SVDs {ref_time:.0f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
