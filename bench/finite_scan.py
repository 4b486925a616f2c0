"""Benchmark the NaN/Inf scan of adapter weights (adapterhub.finite) on a 76 MiB adapter, against hashing it.

The adapter: a rank-16 LoRA on the 7 linear modules x 32 layers of Llama-2-7B in bf16 (40.0M parameters,
~76 MiB adapter_model.safetensors, the size the registry bench uses), random values. Each measurement
runs in a fresh process, so the import a command pays is included (a CLI command is one process), and
the rows alternate: sha256 of the file (what push already does to every byte: the anchor), the scan
with the standard library, the scan with numpy, and a whole ``Registry.push`` with and without the scan.
The page cache is warm (the file was just written and read). Medians of ``--repeat`` runs.

Usage:
    flock /tmp/adapterhub-bench.lock .venv/bin/python bench/finite_scan.py [--repeat 7] [--dir DIR]
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

HIDDEN, INTER, LAYERS, RANK = 4096, 11008, 32, 16
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}

CHILD = {
    "sha256": "import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],'rb')\n"
              "for b in iter(lambda: f.read(1<<20), b''): h.update(b)\n",
    "scan (stdlib)": "import sys\nfrom adapterhub.tensorfile import read_header\nfrom adapterhub import finite\n"
                     "assert sum(finite.count_in_file(t, backend='stdlib') for t in "
                     "read_header(sys.argv[1]).tensors.values()) == 0\n",
    "scan (numpy, import included)": "import sys\nfrom adapterhub.tensorfile import read_header\n"
                                     "from adapterhub import finite\nassert sum(finite.count_in_file(t, "
                                     "backend='numpy') for t in read_header(sys.argv[1]).tensors.values()) == 0\n",
    "push (with the scan)": "import sys\nfrom adapterhub.registry import Registry\n"
                            "Registry(sys.argv[3]).push(sys.argv[2], 'x')\n",
    "push (scan disabled)": "import sys\nimport adapterhub.finite as f\nf.ensure_finite = lambda *a, **k: None\n"
                            "from adapterhub.registry import Registry\nRegistry(sys.argv[3]).push(sys.argv[2], 'x')\n",
}


def make_adapter(root: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for name, (out_f, in_f) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=g) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=g) * 0.01).to(torch.bfloat16)
    out = root / "adapter"
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", '
        '"o_proj", "gate_proj", "up_proj", "down_proj"], "task_type": "CAUSAL_LM"}')
    return out


def run(code: str, weights: Path, adapter: Path, registry: Path) -> float:
    shutil.rmtree(registry, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(weights), str(adapter), str(registry)], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="finite-bench-", dir=args.dir))
    try:
        adapter = make_adapter(root)
        weights = adapter / "adapter_model.safetensors"
        size = weights.stat().st_size
        weights.read_bytes()  # warm the page cache
        times: dict[str, list[float]] = {k: [] for k in CHILD}
        run(CHILD["sha256"], weights, adapter, root / "reg")  # one untimed round of imports
        for _ in range(args.repeat):
            for name, code in CHILD.items():
                times[name].append(run(code, weights, adapter, root / "reg"))
        print(f"\nadapter_model.safetensors: {size / 2**20:.1f} MiB (bf16, {size // 2 // 10**6}M values)\n")
        print("| process (fresh each run) | median s | runs (s) |")
        print("|---|---|---|")
        for name, ts in times.items():
            print(f"| {name} | {statistics.median(ts):.3f} | {', '.join(f'{t:.2f}' for t in ts)} |")
        base = statistics.median(times["push (scan disabled)"])
        extra = statistics.median(times["push (with the scan)"]) - base
        print(f"\npush: the scan adds {extra:+.3f} s to {base:.3f} s ({extra / base:+.0%}); "
              f"load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
