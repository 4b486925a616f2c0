"""Wall time of every everyday CLI command, each in a new process as a user runs it, and whether it
imported torch: on the demo registry and on a 1,000-version registry, for every adapter kind.

Commands: ``--help``, ``list``, ``show``, ``inspect``, ``check``, ``push``, ``pull`` (same format),
``verify``, ``gc --dry-run`` and ``gc``. Adapter kinds: LoRA (the `adapters` library's format and
PEFT's), IA3 (PEFT), bottleneck ``seq_bn`` and ``double_seq_bn``, prefix tuning in the `adapters`
library's layout (and its flat variant) and in PEFT's layout, on the tiny Llama base of the test
fixtures. The demo registry is a copy of ``registry/demo`` with one version of each kind above pushed
into it; the 1,000-version registry holds 100 names x 10 versions of tiny LoRA/IA3/prefix adapters.

Each command runs --repeat times (median reported) through a two-line wrapper that prints, at exit,
whether ``torch`` is in ``sys.modules``; anchors: a bare interpreter and ``import click``. Not a test:
numbers move with the machine's load (printed beside them). Goal: no torch, <= 0.3 s each.

    .venv/bin/python bench/cli.py [--repeat N] [--versions N] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FIX = ROOT / "tests" / "fixtures" / "adapters_lib"
BASE = FIX / "tiny_llama_base"
WRAPPER = ("import sys, atexit\n"
           "atexit.register(lambda: sys.stderr.write('\\nBENCH-TORCH=%d\\n' % ('torch' in sys.modules)))\n"
           "from adapterhub.cli import main\nsys.argv[0] = 'adapterhub'\nmain()\n")
GOAL_S = 0.3


def make_inputs(work: Path) -> dict[str, Path]:
    """One adapter directory per kind (made here where no fixture exists: PEFT LoRA, IA3, PEFT prefix)."""
    import torch

    from adapterhub.adapter import Adapter, IA3Spec, Tensors
    from adapterhub.formats import read_adapter, write_adapter

    kinds = {"lora (adapters lib)": FIX / "llama_lora", "seq_bn": FIX / "llama_seq_bn",
             "double_seq_bn": FIX / "llama_double_seq_bn", "prefix (adapters layout)":
             FIX / "llama_prefix_tuning_safetensors", "prefix (flat)": FIX / "llama_prefix_tuning_flat_safetensors"}
    lora = read_adapter(FIX / "llama_lora")
    kinds["lora (peft)"] = write_adapter(lora, work / "in-lora-peft", format="peft")
    g = torch.Generator().manual_seed(0)
    ia3 = Adapter(kind="ia3", spec=IA3Spec(target_modules=("k_proj", "v_proj", "down_proj"),
                                           feedforward_modules=("down_proj",)),
                  tensors=Tensors({f"model.layers.{i}.{m}.ia3_l": 1 + 0.1 * torch.randn(*shape, generator=g)
                                   for i in range(2) for m, shape in (("self_attn.k_proj", (32, 1)),
                                                                      ("self_attn.v_proj", (32, 1)),
                                                                      ("mlp.down_proj", (1, 128)))}))
    kinds["ia3 (peft)"] = write_adapter(ia3, work / "in-ia3-peft", format="peft")
    subprocess.run([str(Path(PY).with_name("adapterhub")), "convert", str(FIX / "llama_prefix_tuning_safetensors"),
                    "-o", str(work / "in-prefix-peft"), "--format", "peft", "--base", str(BASE)], check=True,
                   capture_output=True)
    kinds["prefix (peft layout)"] = work / "in-prefix-peft"
    return kinds


def reg_name(kind: str) -> str:
    """``"prefix (peft layout)"`` -> ``"bench/prefix-peft"``."""
    head, _, rest = kind.partition(" (")
    return "bench/" + head + ("-" + rest.split(" ")[0].rstrip(")") if rest else "")


def populate(root: Path, versions: int, kinds: dict[str, Path], work: Path) -> None:
    """``versions`` real pushes of PEFT directories (LoRA, IA3, prefix in turn): 100 names x N versions,
    each with different weights (so a pull in the stored format is a plain copy)."""
    from adapterhub.adapter import Tensors
    from adapterhub.formats import read_adapter, write_adapter
    from adapterhub.registry import Registry

    sources = [read_adapter(kinds[k]) for k in ("lora (peft)", "ia3 (peft)", "prefix (peft layout)")]
    reg = Registry(root)
    n = 0
    for v in range(max(1, versions // 100)):
        for k in range(min(100, versions)):
            a = sources[k % 3]
            t = {name: a.tensors[name] + (n + 1) * 1e-3 for name in a.tensors}
            d = write_adapter(a.replace(tensors=Tensors(t)), work / "populate", format="peft", overwrite=True)
            reg.push(d, f"team-{k // 10}/n-{k:02d}", tags=["prod"] if v == 0 else [])
            n += 1
    reg.close()


def run(args: list[str], registry: Path, repeat: int, fresh: Path | None = None) -> tuple[float, list[float], bool]:
    """Median wall seconds, every run, and whether torch was imported, of ``adapterhub ARGS``.
    ``{i}`` in an argument is replaced by the run's number; ``fresh`` is removed before each run."""
    env = {**os.environ, "ADAPTERHUB_REGISTRY": str(registry), "HF_HUB_OFFLINE": "1"}
    times, torch_seen = [], False
    for i in range(repeat):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        argv = [a.replace("{i}", str(i)) for a in args]
        t0 = time.perf_counter()
        p = subprocess.run([PY, "-c", WRAPPER, *argv], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode not in (0, 1) or "BENCH-TORCH=" not in p.stderr:
            raise SystemExit(f"adapterhub {' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        torch_seen |= "BENCH-TORCH=1" in p.stderr
    return statistics.median(times), times, torch_seen


def anchor(code: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs per command (median reported)")
    ap.add_argument("--versions", type=int, default=1000, help="versions in the large registry")
    ap.add_argument("--dir", help="parent of the work directory (default: system temp)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cli-bench-", dir=args.dir))
    rows: list[tuple[str, str, str, float, list[float], bool]] = []
    try:
        t0 = time.perf_counter()
        kinds = make_inputs(work)
        demo = work / "demo"
        shutil.copytree(ROOT / "registry" / "demo", demo)
        from adapterhub.registry import Registry

        reg = Registry(demo)
        for kind, d in kinds.items():
            reg.push(d, reg_name(kind))
        reg.close()
        large = work / "large"
        populate(large, args.versions, kinds, work)
        setup = time.perf_counter() - t0
        print(f"setup (untimed) {setup:.0f} s; load {load()}", file=sys.stderr, flush=True)

        def add(what: str, kind: str, reg_label: str, argv: list[str], registry: Path,
                fresh: Path | None = None) -> None:
            before = load()
            med, times, torch_seen = run(argv, registry, args.repeat, fresh)
            rows.append((what, kind, f"{reg_label} (load {before})", med, times, torch_seen))
            print(f"  {what} [{kind}] on {reg_label}: {med * 1e3:.0f} ms, torch {'yes' if torch_seen else 'no'}",
                  file=sys.stderr, flush=True)

        py_bare = anchor("pass", args.repeat)
        py_click = anchor("import click", args.repeat)
        py_torch = anchor("import torch", max(1, args.repeat // 2))
        for label, registry in (("demo", demo), (f"{args.versions:,} versions", large)):
            add("--help", "-", label, ["--help"], registry)
            add("list", "-", label, ["list"], registry)
            add("verify", "-", label, ["verify"], registry)
            add("gc --dry-run", "-", label, ["gc", "--dry-run"], registry)
            add("gc", "-", label, ["gc"], registry)
        for kind, d in kinds.items():
            name = reg_name(kind)
            ref = name + "@1"
            add("inspect", kind, "-", ["inspect", str(d)], demo)
            add("check", kind, "-", ["check", str(d), "--base", str(BASE)], demo)
            add("push (new name each run)", kind, "demo", ["push", str(d), name + "-{i}"], demo)
            add("show", kind, "demo", ["show", ref], demo)
            add("pull (stored format, copy)", kind, "demo", ["pull", ref, "-o", str(work / "pulled"), "--force"],
                demo, fresh=work / "pulled")
        reg = Registry(large)
        some = reg.list()
        reg.close()
        by_kind: dict[str, str] = {}
        for v in some:
            by_kind.setdefault(v.kind, v.ref)
        for kind, ref in sorted(by_kind.items()):
            add("show", kind, f"{args.versions:,} versions", ["show", ref], large)
            add("pull (stored format, copy)", kind, f"{args.versions:,} versions",
                ["pull", ref, "-o", str(work / "pulled"), "--force"], large, fresh=work / "pulled")
        add("push (new name each run)", "lora (peft)", f"{args.versions:,} versions",
            ["push", str(kinds["lora (peft)"]), "team-x/new-{i}"], large)
        add("list 'team-7/*'", "-", f"{args.versions:,} versions", ["list", "team-7/*"], large)

        print(f"\n### CLI commands: wall time of a new process each (median of {args.repeat}), torch imported?\n")
        print(f"anchors: `python -c pass` {py_bare * 1e3:.0f} ms; `python -c 'import click'` {py_click * 1e3:.0f} ms; "
              f"`python -c 'import torch'` {py_torch * 1e3:.0f} ms\n")
        print("| command | adapter kind | registry (load avg before) | wall (median) | all runs (ms) | torch imported "
              f"| <= {GOAL_S} s |")
        print("|---|---|---|---|---|---|---|")
        for what, kind, reg_label, med, times, torch_seen in rows:
            runs = ", ".join(f"{t * 1e3:.0f}" for t in times)
            print(f"| `{what}` | {kind} | {reg_label} | {med * 1e3:.0f} ms | {runs} |"
                  f" {'**yes**' if torch_seen else 'no'} | {'yes' if med <= GOAL_S else '**no**'} |")
        bad = [r for r in rows if r[5]]
        slow = [r for r in rows if r[3] > GOAL_S]
        print(f"\n{len(rows)} commands: {len(bad)} imported torch, {len(slow)} over {GOAL_S} s; "
              f"{os.cpu_count()} cores; load at the end {load()}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
