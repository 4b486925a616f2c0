"""Benchmark the runtime's LoRA forward against PEFT's, relative to the bare base model.

A Llama-shaped ``LlamaForCausalLM`` (hidden 1024, intermediate 2816, 16 heads / 8 kv-heads, 4 layers,
vocab 4096; seeded random weights; float32; eval, no grad) carries four seeded random rank-16 LoRAs on
all seven linear modules of every layer (alpha 32). PEFT holds the four as adapters of one ``PeftModel``
(``set_adapter(["a0"])`` or all four active: it loops over the active adapters in every module); ours
attaches ``Sum(a0)`` or ``Sum(a0, a1, a2, a3)`` built from the very same tensors to a second copy of the
base (one concatenated rank-16 / rank-64 factor pair per module).

Shapes: prompt (batch 1 x 128 tokens) and decode (batch 1 x 1 token, no KV cache), ``use_cache=False``.
Every variant (bare, ours 1/4, PEFT 1/4) is timed in the same run, interleaved round by round: one
sample is the mean of ``n`` forwards (``n`` chosen so a sample of the bare model takes ~50 ms), the
best of ``--rounds`` samples is reported, with the overhead over the bare model. The outputs of ours and
PEFT are compared too (max abs difference of the logits).

Usage (one benchmark at a time on a shared machine):
    flock /tmp/adapterhub-bench.lock .venv/bin/python bench/runtime.py          # ~2 min on 2 cores
    flock /tmp/adapterhub-bench.lock .venv/bin/python bench/runtime.py --rounds 5 --layers 2   # quicker

Options: ``--rounds K``, ``--layers N``, ``--threads N`` (``torch.set_num_threads``). With other work on
the cores both sides slow down and the overheads get noisy; the footer prints the load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from collections.abc import Callable

import torch

from adapterhub.adapter import Adapter, LoraSpec, Tensors
from adapterhub.runtime import Sum, attach

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 8, 4096
R, ALPHA = 16, 32.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = (("prompt", 128), ("decode", 1))
NAMES = ("a0", "a1", "a2", "a3")


def build(layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                         max_position_embeddings=512)
    base = LlamaForCausalLM(config).eval()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS)),
                          adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft.add_adapter(name, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    adapters = []
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            g = torch.Generator().manual_seed(100 + i)
            tensors = {}
            for mod_name, module in peft.base_model.model.named_modules():
                if hasattr(module, "lora_A") and name in module.lora_A:
                    a, b = module.lora_A[name].weight, module.lora_B[name].weight
                    a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=g) * 0.02)
                    tensors[f"{mod_name}.lora_A"] = a.detach().clone()
                    tensors[f"{mod_name}.lora_B"] = b.detach().clone()
            adapters.append(Adapter(kind="lora", spec=LoraSpec(r=R, alpha=ALPHA, target_modules=TARGETS),
                                    tensors=Tensors(tensors), name=name))
    return base, peft.eval(), adapters


def timer(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    base, peft, adapters = build(args.layers)
    variants = {
        "bare": (None, None),
        "ours 1": (Sum(adapters[0]), None), "ours 4": (Sum(*adapters), None),
        "PEFT 1": (None, [NAMES[0]]), "PEFT 4": (None, list(NAMES)),
    }
    rows = []
    for shape, tokens in SHAPES:
        ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(7))

        def run_base(ids: torch.Tensor = ids) -> object:
            return base(input_ids=ids, use_cache=False).logits

        def run_peft(ids: torch.Tensor = ids) -> object:
            return peft(input_ids=ids, use_cache=False).logits

        run_base()
        n = max(1, round(0.05 / timer(run_base, 3)))
        best = {v: float("inf") for v in variants}
        diffs = {}
        for rnd in range(args.rounds):
            order = list(variants)[rnd % len(variants):] + list(variants)[:rnd % len(variants)]
            for v in order:
                tree, active = variants[v]
                if active is not None:
                    peft.base_model.set_adapter(active)
                    run_peft()
                    best[v] = min(best[v], timer(run_peft, n))
                    if rnd == 0:
                        diffs[v] = run_peft()
                elif tree is not None:
                    with attach(base, tree):
                        run_base()
                        best[v] = min(best[v], timer(run_base, n))
                        if rnd == 0:
                            diffs[v] = run_base()
                else:
                    best[v] = min(best[v], timer(run_base, n))
        for k in ("1", "4"):
            diff = float((diffs[f"ours {k}"] - diffs[f"PEFT {k}"]).abs().max())
            rows.append((shape, tokens, k, best["bare"], best[f"ours {k}"], best[f"PEFT {k}"], diff, n))
    print(f"Llama-shaped: hidden {HIDDEN}, intermediate {INTER}, {HEADS}/{KV_HEADS} heads, {args.layers} layers, "
          f"vocab {VOCAB}, float32; LoRA r={R} on {', '.join(TARGETS)}; best of {args.rounds} interleaved rounds\n")
    print("| shape | active LoRAs | bare ms | ours ms | ours overhead | PEFT ms | PEFT overhead | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, tokens, k, bare, ours, theirs, diff, n in rows:
        print(f"| {shape} (T={tokens}, x{n}) | {k} | {bare * 1e3:.2f} | {ours * 1e3:.2f} | {ours / bare - 1:+.1%} | "
              f"{theirs * 1e3:.2f} | {theirs / bare - 1:+.1%} | {diff:.1e} |")
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, {os.cpu_count()} cpus, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
