"""Benchmark multi-tenant serving: adapterhub's Pool against PEFT's mixed batch and PEFT load/set per request.

The model is a Llama-shaped ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 8 heads, 4 layers, vocab
8000; seeded random weights; float32; eval, no grad). A registry (built once in ``--work``, default
``/tmp/adapterhub-serve-bench``, reused when complete) holds 1,000 seeded random LoRAs on q/k/v/o of every
layer, pushed as PEFT directories (``bench/a0000`` ... ``bench/a0999``): ranks 4/8/16 in turn, alpha 16,
every third one rsLoRA. Requests name adapter ``k`` with probability proportional to ``1 / (k + 1) ** 1.1``
(Zipf), 1 in 20 requests names none; batches of 32 prompts of 64 tokens.

Contenders, from the same run:

- **base**: the bare model, no adapter (the reference of every ratio).
- **ours**: ``adapterhub.Pool(model, registry=..., slots=64, max_rank=16)``: adapters read from the registry
  on demand (verified or stamp-trusted blobs, memory-mapped), one slot per adapter, one row per request.
- **PEFT mixed**: one ``PeftModel`` with the batch's adapters loaded from the registry's snapshot
  directories (``load_adapter``; least recently used ones deleted beyond 64), ``adapter_names=`` per row.
- **PEFT per request**: the same ``PeftModel``, requests served one at a time (``load_adapter`` if
  needed, ``set_adapter``, ``generate``).

Measured:

1. forward time relative to the bare model, prompt (32 x 64) and decode (32 x 1 with a 64-token KV cache),
   over 3 Zipf batches whose adapters are resident/loaded, timed round-robin (base, ours, PEFT in turn), the
   median of per-round ratios; max abs difference of ours vs PEFT's logits;
2. serving a Zipf stream of ``--batches`` batches (per-request PEFT: the first 2 batches only): time to first
   token per request (loading included; p50/p99), tokens/s of greedy generation of 16 tokens, interleaved
   batch by batch;
3. loading: the 1st vs the 1,000th adapter into a pool, then 10,000 load/evict cycles (64 slots) with RSS
   sampled every 1,000 loads; PEFT's ``load_adapter`` of its 2nd vs 100th adapter;
4. peak RSS of each contender serving 3 batches, each in a process of its own, and the bytes resident for
   one base + the pool vs one merged copy of the model per adapter.

Usage (one benchmark at a time on a shared machine):
    flock /tmp/adapterhub-bench.lock .venv/bin/python bench/serve.py             # ~21 min on 2 busy cores
    flock /tmp/adapterhub-bench.lock .venv/bin/python bench/serve.py --quick     # fewer rounds/batches/cycles

Options: ``--work DIR``, ``--adapters N`` (1,000), ``--batches N`` (8), ``--rounds N`` (7), ``--cycles N``
(10,000), ``--threads N``. The footer prints the load average: with other work on the cores every time
gets noisy, ratios less so (each is taken within one round).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HIDDEN, INTER, HEADS, LAYERS, VOCAB = 512, 1376, 8, 4, 8000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANKS = (4, 8, 16)
SLOTS, MAX_RANK, BATCH, PROMPT, NEW_TOKENS, ZIPF = 64, 16, 32, 64, 16, 1.1
PEFT_CAP = 64


def build_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                         max_position_embeddings=256, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def ref(k: int) -> str:
    return f"bench/a{k:04d}"


def make_registry(work: Path, n: int) -> Path:
    """``work/reg`` holding ``n`` LoRAs (built once; a marker file says it is complete)."""
    from adapterhub.adapter import Adapter, LoraSpec, Tensors
    from adapterhub.formats import write_adapter
    from adapterhub.registry import Registry

    reg_dir, marker = work / "reg", work / f"complete-{n}"
    if marker.exists():
        return reg_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reg = Registry(reg_dir)
    start = time.perf_counter()
    for k in range(n):
        g = torch.Generator().manual_seed(1000 + k)
        r = RANKS[k % len(RANKS)]
        tensors = {}
        for layer in range(LAYERS):
            for m in TARGETS:
                name = f"model.layers.{layer}.self_attn.{m}"
                tensors[name + ".lora_A"] = torch.randn(r, HIDDEN, generator=g) / HIDDEN ** 0.5
                tensors[name + ".lora_B"] = torch.randn(HIDDEN, r, generator=g) * 0.02
        adapter = Adapter("lora", LoraSpec(r=r, alpha=16.0, use_rslora=k % 3 == 2, target_modules=TARGETS),
                          Tensors(tensors), name=ref(k))
        d = write_adapter(adapter, work / "tmp-adapter", format="peft", overwrite=True)
        reg.push(d, ref(k))
        if k % 100 == 99:
            print(f"  pushed {k + 1}/{n} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    shutil.rmtree(work / "tmp-adapter", ignore_errors=True)
    marker.write_text(f"{n} adapters, {time.perf_counter() - start:.1f} s to push\n")
    return reg_dir


def zipf_batches(n_batches: int, n_adapters: int, seed: int) -> list[list[str | None]]:
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([1.0 / (k + 1) ** ZIPF for k in range(n_adapters)])
    out = []
    for _ in range(n_batches):
        ks = torch.multinomial(weights, BATCH, replacement=True, generator=g).tolist()
        none = torch.rand(BATCH, generator=g) < 0.05
        out.append([None if none[i] else ref(k) for i, k in enumerate(ks)])
    return out


def prompt_ids(seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeftServer:
    """PEFT's way: one PeftModel, adapters loaded from the registry's snapshot directories, LRU-capped."""

    def __init__(self, model: Any, reg: Any) -> None:
        self.model, self.reg, self.peft, self.loaded = model, reg, None, []

    def ensure(self, names: list[str | None]) -> float:
        """Load what ``names`` needs; the seconds it took."""
        from peft import PeftModel

        start = time.perf_counter()
        for name in dict.fromkeys(n for n in names if n is not None):
            key = name.replace("/", "_")
            if key in self.loaded:
                self.loaded.remove(key)
                self.loaded.append(key)
                continue
            path = str(self.reg.snapshot(name))
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=key).eval()
            else:
                self.peft.load_adapter(path, adapter_name=key)
            self.loaded.append(key)
            keep = {n.replace("/", "_") for n in names if n is not None}
            while len(self.loaded) > PEFT_CAP:
                victim = next(v for v in self.loaded if v not in keep)
                self.loaded.remove(victim)
                self.peft.delete_adapter(victim)
        return time.perf_counter() - start

    @staticmethod
    def names(rows: list[str | None]) -> list[str]:
        return ["__base__" if r is None else r.replace("/", "_") for r in rows]


# --- parts (each may run in a process of its own) ------------------------------------------------


def part_forward(args: argparse.Namespace, reg_dir: Path) -> dict[str, Any]:
    import adapterhub
    from adapterhub.registry import Registry

    base = build_model()
    peft_model = build_model()
    reg = Registry(reg_dir)
    pool = adapterhub.Pool(base, registry=reg, slots=SLOTS, max_rank=MAX_RANK, targets=list(TARGETS))
    server = PeftServer(peft_model, reg)
    batches = zipf_batches(3, args.adapters, seed=7)
    out: dict[str, Any] = {"diff": 0.0}
    with torch.no_grad():
        for shape in ("prompt", "decode"):
            ratios: dict[str, list[float]] = {"ours": [], "peft": []}
            times: dict[str, list[float]] = {"base": [], "ours": [], "peft": []}
            for b, rows in enumerate(batches):
                ids = prompt_ids(b)
                pool.prepare(rows)
                server.ensure(rows)
                names = server.names(rows)
                fresh: list[Any] = []
                if shape == "prompt":
                    def run_base(ids: Any = ids) -> Any:
                        return base(input_ids=ids)

                    def run_ours(rows: Any = rows, ids: Any = ids) -> Any:
                        return pool.forward(rows, input_ids=ids)

                    def run_peft(ids: Any = ids, names: Any = names) -> Any:
                        return server.peft(input_ids=ids, adapter_names=names)
                    o, p = run_ours().logits, run_peft().logits
                    out["diff"] = max(out["diff"], float((o - p).abs().max()))
                else:
                    cache = base(input_ids=ids, use_cache=True).past_key_values
                    nxt = ids[:, -1:]

                    def run_base(nxt: Any = nxt, fresh: Any = fresh) -> Any:
                        return base(input_ids=nxt, past_key_values=fresh.pop(), use_cache=True)

                    def run_ours(rows: Any = rows, nxt: Any = nxt, fresh: Any = fresh) -> Any:
                        return pool.forward(rows, input_ids=nxt, past_key_values=fresh.pop(), use_cache=True)

                    def run_peft(nxt: Any = nxt, fresh: Any = fresh, names: Any = names) -> Any:
                        return server.peft(input_ids=nxt, past_key_values=fresh.pop(), use_cache=True,
                                           adapter_names=names)
                for _ in range(args.rounds):
                    row: dict[str, float] = {}
                    for name, fn in (("base", run_base), ("ours", run_ours), ("peft", run_peft)):
                        n = 3 if shape == "prompt" else 20
                        total = 0.0
                        for _ in range(n):
                            if shape == "decode":
                                fresh.append(copy.deepcopy(cache))
                            start = time.perf_counter()
                            fn()
                            total += time.perf_counter() - start
                        row[name] = total / n
                        times[name].append(row[name])
                    ratios["ours"].append(row["ours"] / row["base"])
                    ratios["peft"].append(row["peft"] / row["base"])
            out[shape] = {"base_ms": statistics.median(times["base"]) * 1e3,
                          "ours_ms": statistics.median(times["ours"]) * 1e3,
                          "peft_ms": statistics.median(times["peft"]) * 1e3,
                          "ours_x": statistics.median(ratios["ours"]), "peft_x": statistics.median(ratios["peft"])}
    out["pool_bytes"], out["base_bytes"] = pool.nbytes, pool.base_nbytes()
    return out


def part_serve(args: argparse.Namespace, reg_dir: Path, only: str | None = None) -> dict[str, Any]:
    """Serve the Zipf stream, contenders interleaved batch by batch (or ``only`` one, for its peak RSS)."""
    import adapterhub
    from adapterhub.registry import Registry

    reg = Registry(reg_dir)
    modes = [only] if only else ["base", "ours", "peft_mixed", "peft_single"]
    models = {m: build_model() for m in modes}
    pool = adapterhub.Pool(models["ours"], registry=reg, slots=SLOTS, max_rank=MAX_RANK,
                           targets=list(TARGETS)) if "ours" in models else None
    mixed = PeftServer(models["peft_mixed"], reg) if "peft_mixed" in models else None
    single = PeftServer(models["peft_single"], reg) if "peft_single" in models else None
    batches = zipf_batches(3 if only else args.batches, args.adapters, seed=11)
    ttft: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[float]] = {m: [0.0, 0.0] for m in modes}  # tokens, seconds
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for b, rows in enumerate(batches):
            ids = prompt_ids(100 + b)
            mask = torch.ones_like(ids)
            if "base" in modes:
                start = time.perf_counter()
                models["base"](input_ids=ids)
                ttft["base"] += [time.perf_counter() - start] * BATCH
                start = time.perf_counter()
                models["base"].generate(input_ids=ids, attention_mask=mask, **gen)
                tokens["base"][0] += BATCH * NEW_TOKENS
                tokens["base"][1] += time.perf_counter() - start
            if pool is not None:
                start = time.perf_counter()
                pool.forward(rows, input_ids=ids)  # loads what the batch needs, then the prefill
                ttft["ours"] += [time.perf_counter() - start] * BATCH
                start = time.perf_counter()
                pool.generate(rows, input_ids=ids, attention_mask=mask, **gen)
                tokens["ours"][0] += BATCH * NEW_TOKENS
                tokens["ours"][1] += time.perf_counter() - start
            if mixed is not None:
                start = time.perf_counter()
                mixed.ensure(rows)
                mixed.peft(input_ids=ids, adapter_names=mixed.names(rows))
                ttft["peft_mixed"] += [time.perf_counter() - start] * BATCH
                start = time.perf_counter()
                mixed.peft.generate(input_ids=ids, attention_mask=mask, adapter_names=mixed.names(rows), **gen)
                tokens["peft_mixed"][0] += BATCH * NEW_TOKENS
                tokens["peft_mixed"][1] += time.perf_counter() - start
            if single is not None and (only or b < 2):
                clock = 0.0  # requests queue behind each other
                for i, row in enumerate(rows):
                    start = time.perf_counter()
                    single.ensure([row])
                    if row is None:
                        with single.peft.disable_adapter():
                            single.peft(input_ids=ids[i:i + 1])
                            first = time.perf_counter()
                            single.peft.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **gen)
                    else:
                        single.peft.set_adapter(row.replace("/", "_"))
                        single.peft(input_ids=ids[i:i + 1])
                        first = time.perf_counter()
                        single.peft.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **gen)
                    end = time.perf_counter()
                    ttft["peft_single"].append(clock + first - start)
                    clock += end - start
                    tokens["peft_single"][0] += NEW_TOKENS
                    tokens["peft_single"][1] += end - start - (first - start)
    out: dict[str, Any] = {}
    for m in modes:
        q = sorted(ttft[m])
        p99 = q[min(len(q) - 1, int(0.99 * len(q)))]
        out[m] = {"ttft_p50_ms": statistics.median(q) * 1e3, "ttft_p99_ms": p99 * 1e3,
                  "tokens_per_s": tokens[m][0] / tokens[m][1], "requests": len(q), "peak_rss": peak_rss()}
    if pool is not None:
        out["ours"]["pool"] = pool.stats()
    return out


def part_load(args: argparse.Namespace, reg_dir: Path) -> dict[str, Any]:
    import adapterhub
    from adapterhub.registry import Registry

    model = build_model()
    pool = adapterhub.Pool(model, registry=Registry(reg_dir), slots=SLOTS, max_rank=MAX_RANK, targets=list(TARGETS))
    times, samples = [], []
    for i in range(args.cycles):
        start = time.perf_counter()
        pool.load(ref(i % args.adapters))
        times.append(time.perf_counter() - start)
        if (i + 1) % 1000 == 0 or i + 1 == args.cycles:
            samples.append((i + 1, rss()))
    n = args.adapters
    return {"first_ms": times[0] * 1e3, "first10_ms": statistics.median(times[1:11]) * 1e3,
            "last10_ms": statistics.median(times[n - 10:n]) * 1e3, "nth_ms": times[n - 1] * 1e3,
            "all_median_ms": statistics.median(times) * 1e3, "rss": samples, "loads": pool.counters["loads"],
            "evictions": pool.counters["evictions"], "peak_rss": peak_rss()}


def part_peft_load(args: argparse.Namespace, reg_dir: Path) -> dict[str, Any]:
    from adapterhub.registry import Registry

    server = PeftServer(build_model(), Registry(reg_dir))
    times = [server.ensure([ref(k)]) for k in range(min(100, args.adapters))]
    return {"second_ms": times[1] * 1e3, "hundredth_ms": times[-1] * 1e3, "n": len(times)}


def part_strategy(args: argparse.Namespace, reg_dir: Path) -> dict[str, Any]:
    """One q_proj-shaped module (512 x 512), 32 rows over 16 adapters of rank 16: the pool's gather + bmm
    against grouping rows by adapter (a loop over the batch's distinct adapters: gather its rows, two
    matmuls, scatter-add), relative to the bare Linear; interleaved, median of per-round ratios."""
    import torch.nn.functional as F
    from torch import nn

    from adapterhub.runtime.slots import SlotSite, SlotState

    torch.manual_seed(0)
    lin = nn.Linear(HIDDEN, HIDDEN, bias=False)
    state = SlotState()
    site = SlotSite(lin, "q_proj", state, slots=SLOTS, max_rank=MAX_RANK)
    for slot in range(1, SLOTS + 1):
        site.write_lora(slot, torch.randn(MAX_RANK, HIDDEN) * 0.05, torch.randn(MAX_RANK, HIDDEN) * 0.05)
    idx = torch.randint(1, 17, (BATCH,), generator=torch.Generator().manual_seed(1))
    groups = [(int(u), (idx == u).nonzero().flatten()) for u in idx.unique()]
    state.set(idx, has_none=False)

    def grouped(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, lin.weight)
        for u, rows in groups:
            xs = x.index_select(0, rows)
            y.index_add_(0, rows, (xs @ site.a[u].t()) @ site.bt[u])
        return y

    out: dict[str, Any] = {"distinct": len(groups)}
    with torch.no_grad():
        for shape, t in (("prompt", PROMPT), ("decode", 1)):
            x = torch.randn(BATCH, t, HIDDEN)
            fns = {"base": lambda x=x: F.linear(x, lin.weight), "gather": lambda x=x: site(x),
                   "group": lambda x=x: grouped(x)}
            ratios: dict[str, list[float]] = {"gather": [], "group": []}
            n = 5 if shape == "prompt" else 200
            for _ in range(max(args.rounds, 5) * 3):
                row = {}
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(n):
                        fn()
                    row[name] = (time.perf_counter() - start) / n
                ratios["gather"].append(row["gather"] / row["base"])
                ratios["group"].append(row["group"] / row["base"])
            out[shape] = {k: statistics.median(v) for k, v in ratios.items()}
    return out


PARTS = {"strategy": part_strategy, "forward": part_forward, "serve": part_serve, "load": part_load,
         "peft-load": part_peft_load}


def run_part(name: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--part", name, "--work", str(args.work), "--adapters", str(args.adapters),
           "--batches", str(args.batches), "--rounds", str(args.rounds), "--cycles", str(args.cycles),
           "--threads", str(args.threads), *(extra or [])]
    print(f"  running {name} {' '.join(extra or [])} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/adapterhub-serve-bench"))
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cycles", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 rounds, 4 batches, 2,000 cycles")
    p.add_argument("--part", choices=[*PARTS, "serve-only"], help=argparse.SUPPRESS)
    p.add_argument("--only", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.batches, args.cycles = 3, 4, 2000
    if args.part:
        reg_dir = args.work / "reg"
        result = part_serve(args, reg_dir, only=args.only) if args.part == "serve-only" else \
            PARTS[args.part](args, reg_dir)
        print(json.dumps(result))
        return
    start = time.perf_counter()
    load_before = os.getloadavg()
    reg_dir = make_registry(args.work, args.adapters)
    strategy = run_part("strategy", args)
    fwd = run_part("forward", args)
    serve = run_part("serve", args)
    load = run_part("load", args)
    peft_load = run_part("peft-load", args)
    rss = {m: run_part("serve-only", args, ["--only", m])[m]["peak_rss"]
           for m in ("base", "ours", "peft_mixed", "peft_single")}
    base_bytes, pool_bytes = fwd["base_bytes"], fwd["pool_bytes"]
    load_after = os.getloadavg()

    print(f"\n## bench/serve.py: {args.adapters:,} LoRAs (ranks 4/8/16 on q/k/v/o, {LAYERS} layers, hidden {HIDDEN}), "
          f"Zipf({ZIPF}) requests, batch {BATCH} x {PROMPT} tokens, pool {SLOTS} slots x rank {MAX_RANK}\n")
    print("| measure | base | ours (Pool) | PEFT mixed batch | PEFT load/set per request |")
    print("| --- | --- | --- | --- | --- |")
    for shape, what in (("prompt", f"{BATCH} x {PROMPT}"), ("decode", f"{BATCH} x 1, {PROMPT}-token cache")):
        f = fwd[shape]
        print(f"| forward, {shape} ({what}) | {f['base_ms']:.1f} ms (1.00x) | {f['ours_ms']:.1f} ms "
              f"({f['ours_x']:.2f}x) | {f['peft_ms']:.1f} ms ({f['peft_x']:.2f}x) | - |")
    cells = {m: serve[m] for m in ("base", "ours", "peft_mixed", "peft_single")}
    print("| tokens/s (greedy, 16 new tokens) | " + " | ".join(f"{cells[m]['tokens_per_s']:.0f}" for m in cells)
          + " |")
    print("| time to first token p50 / p99 (loading included) | "
          + " | ".join(f"{cells[m]['ttft_p50_ms']:.0f} / {cells[m]['ttft_p99_ms']:.0f} ms" for m in cells) + " |")
    print(f"| load an adapter: 1st / median 2nd-11th / median last 10 of the first {args.adapters:,} / "
          f"{args.adapters:,}th | - | {load['first_ms']:.1f} / {load['first10_ms']:.1f} / {load['last10_ms']:.1f} / "
          f"{load['nth_ms']:.1f} ms | `load_adapter` 2nd {peft_load['second_ms']:.0f} ms, "
          f"{peft_load['n']}th {peft_load['hundredth_ms']:.0f} ms | (same as mixed) |")
    print("| peak RSS serving 3 batches (own process) | " + " | ".join(mib(rss[m]) for m in cells) + " |")
    samples = load["rss"]
    print(f"| RSS over {args.cycles:,} load/evict cycles ({load['evictions']:,} evictions) | - | "
          + ", ".join(f"{n:,}: {mib(r)}" for n, r in samples[:: max(1, len(samples) // 5)]) +
          f"; last {mib(samples[-1][1])} | - | - |")
    print(f"| resident for {args.adapters:,} adapters | {mib(base_bytes)} (base) | base + pool "
          f"{mib(base_bytes + pool_bytes)} (pool {mib(pool_bytes)}, any number of adapters) | - | "
          "one merged copy per adapter: "
          f"{args.adapters:,} x {mib(base_bytes)} = {args.adapters * base_bytes / 2**30:,.1f} GiB |")
    print(f"\nmax abs difference ours vs PEFT mixed batch (prompt logits): {fwd['diff']:.2e}. "
          f"Pool over the stream: {serve['ours']['pool']['loads']} loads, {serve['ours']['pool']['hits']} hits, "
          f"{serve['ours']['pool']['evictions']} evictions.")
    print(f"\nStrategy, one 512 x 512 module, {BATCH} rows over {strategy['distinct']} adapters of rank {MAX_RANK} "
          "(time relative to the bare Linear): gather + bmm (the pool) prompt "
          f"{strategy['prompt']['gather']:.2f}x, decode {strategy['decode']['gather']:.2f}x; grouping rows by "
          f"adapter prompt {strategy['prompt']['group']:.2f}x, decode {strategy['decode']['group']:.2f}x.")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
