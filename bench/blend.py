"""Benchmark ``adapterhub.compose.blend`` against PEFT's ``add_weighted_adapter`` (cat, linear, svd).

One decoder layer's worth of Llama-shaped linear modules (q/k/v/o: hidden x hidden, gate/up:
intermediate x hidden, down: hidden x intermediate; fp32) carries three seeded random rank-16 LoRAs
with different alphas (scales 2, 1, 4). PEFT wraps a tiny custom ``nn.Module`` holding those layers
(``get_peft_model`` + ``add_adapter``, weights copied in) and runs ``add_weighted_adapter`` for every
module; ours runs ``blend()`` on ``Adapter`` values built from the very same tensors. Both get the
weights ``[0.5, 0.3, -0.2]``; svd asks for rank 16.

Reported per shape set and method: wall time (best of at least 10 runs and 3 s for ours, of at least 3
runs and 3 s for PEFT cat/linear, a single run for PEFT svd), the global relative error to the exact result
``sum_i w_i s_i B_i A_i`` (dense, float64, per module; ``sqrt(sum_m ||R_m - E_m||^2 / sum_m ||E_m||^2)``),
the Eckart-Young floor for rank 16 (computed from the singular values of ``B L`` with ``L L^T = A A^T``
of the concatenated exact factors, a route independent of ours), and the peak extra resident memory
of the call (Linux: peak RSS reset through ``/proc/self/clear_refs``, read back from ``VmHWM``).

Usage:
    .venv/bin/python bench/blend.py              # both shape sets: ~4 min on 2 cores, PEFT's svd ~90% of it
    .venv/bin/python bench/blend.py --quick      # hidden 2048 / intermediate 5632 only: ~1 min on 2 cores

Options: ``--repeat N`` / ``--min-seconds S`` (timed runs / seconds per method, at least), ``--threads N``
(``torch.set_num_threads``), ``--peft-reduced-svd`` (PEFT with ``svd_full_matrices=False``). The machine
must not be shared: with
other work on the cores, torch's intra-op threads wait on each other and both sides slow down
several-fold (the footer prints the load average so a reader can tell).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adapterhub.adapter import Adapter, LoraSpec, Tensors
from adapterhub.compose.blend import blend

SHAPE_SETS = (("2048 / 5632", 2048, 5632), ("4096 / 11008", 4096, 11008))
R = 16
ALPHAS = (32.0, 16.0, 64.0)  # scales 2, 1, 4
WEIGHTS = (0.5, 0.3, -0.2)
METHODS = ("cat", "linear", "svd")
SVD_RANK = 16
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PREFIX = "model.layers.0."

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A: r x in, B: out x r)


# --- inputs ---------------------------------------------------------------------------------------------


def module_shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    """Canonical module name -> (out_features, in_features) for one Llama decoder layer."""
    shapes = {f"{PREFIX}self_attn.{n}": (hidden, hidden) for n in ATTN}
    shapes.update({f"{PREFIX}mlp.gate_proj": (inter, hidden), f"{PREFIX}mlp.up_proj": (inter, hidden),
                   f"{PREFIX}mlp.down_proj": (hidden, inter)})
    return shapes


def make_loras(shapes: dict[str, tuple[int, int]], n: int = 3, seed: int = 0) -> list[Factors]:
    """n seeded LoRAs: A ~ N(0, 1/in), B ~ N(0, 0.02^2) with a decaying column spectrum (0.85^j)."""
    out = []
    decay = 0.85 ** torch.arange(R, dtype=torch.float32)
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        f: Factors = {}
        for m, (o, k) in shapes.items():
            A = torch.randn(R, k, generator=gen) / math.sqrt(k)
            B = torch.randn(o, R, generator=gen) * 0.02 * decay
            f[m] = (A, B)
        out.append(f)
    return out


def our_adapters(loras: list[Factors]) -> list[Adapter]:
    return [Adapter(kind="lora", spec=LoraSpec(r=R, alpha=alpha),
                    tensors=Tensors({k: v for m, (A, B) in f.items()
                                     for k, v in ((f"{m}.lora_A", A), (f"{m}.lora_B", B))}))
            for f, alpha in zip(loras, ALPHAS, strict=True)]


# --- measurement helpers --------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+)", fh.read(), re.M).group(1))


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None
PEAK_OK = sys.platform.startswith("linux") and _can_reset_peak()


def measure(fn: Callable[[], object], *, memory: bool = False) -> tuple[float, float | None, object]:
    """(seconds, peak extra RSS in MiB or None, result) of one call.

    With ``memory``, freed heap is first handed back to the OS (``malloc_trim``) so earlier garbage cannot
    hide new allocations, and the peak RSS is reset; the call then also pays for first-touch page faults,
    so timings are taken from separate runs where that matters.
    """
    gc.collect()
    base = None
    if memory:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        if PEAK_OK:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    peak = None if base is None else max(0, _status_kib("VmHWM") - base) / 1024
    return dt, peak, result


def timed_runs(fn: Callable[[], object], min_runs: int, min_seconds: float,
               after: Callable[[object], object] | None = None) -> list[float]:
    """Times of at least ``min_runs`` calls, going on until ``min_seconds`` of wall time have passed."""
    times: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_runs or time.perf_counter() < t_end:
        dt, _, result = measure(fn)
        times.append(dt)
        if after is not None:
            after(result)
    return times


# --- PEFT -----------------------------------------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        for n in ATTN:
            setattr(self, n, nn.utils.skip_init(nn.Linear, hidden, hidden, bias=False))


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.utils.skip_init(nn.Linear, hidden, inter, bias=False)
        self.up_proj = nn.utils.skip_init(nn.Linear, hidden, inter, bias=False)
        self.down_proj = nn.utils.skip_init(nn.Linear, inter, hidden, bias=False)


class _Layer(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.self_attn = _Attn(hidden)
        self.mlp = _Mlp(hidden, inter)


class _Inner(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(hidden, inter)])


class TinyLlamaLayer(nn.Module):
    """Module paths ``model.layers.0.self_attn.q_proj`` ...; base weights are left uninitialised (never read)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.model = _Inner(hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        layer = self.model.layers[0]
        return layer.mlp.down_proj(layer.mlp.up_proj(layer.self_attn.o_proj(x)))


def peft_setup(hidden: int, inter: int, loras: list[Factors]):
    """A PEFT model with adapters a0, a1, a2 holding exactly ``loras``; returns (LoraModel, module -> layer)."""
    from peft import LoraConfig, get_peft_model

    targets = list(ATTN + MLP)
    configs = [LoraConfig(r=R, lora_alpha=a, target_modules=targets, lora_dropout=0.0) for a in ALPHAS]
    pm = get_peft_model(TinyLlamaLayer(hidden, inter), configs[0], adapter_name="a0")
    for i, cfg in enumerate(configs[1:], start=1):
        pm.add_adapter(f"a{i}", cfg)
    lora_model = pm.base_model
    layers = {name: mod for name, mod in lora_model.model.named_modules() if name in loras[0]}
    assert sorted(layers) == sorted(loras[0]), sorted(layers)
    with torch.no_grad():
        for i, f in enumerate(loras):
            for m, (A, B) in f.items():
                layers[m].lora_A[f"a{i}"].weight.copy_(A)
                layers[m].lora_B[f"a{i}"].weight.copy_(B)
                assert layers[m].scaling[f"a{i}"] == ALPHAS[i] / R
    return lora_model, layers


def peft_result(layers: dict[str, nn.Module], name: str) -> tuple[Factors, dict[str, float]]:
    """(module -> (A, B)) and module -> scaling of PEFT's merged adapter ``name``."""
    factors = {m: (layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone())
               for m, layer in layers.items()}
    return factors, {m: float(layer.scaling[name]) for m, layer in layers.items()}


# --- errors ---------------------------------------------------------------------------------------------


def exact_factors(loras: list[Factors], m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated float64 factors (A_cat, B_cat) with B_cat @ A_cat = sum_i w_i s_i B_i A_i."""
    A = torch.cat([f[m][0].double() * (w * a / R) for f, w, a in zip(loras, WEIGHTS, ALPHAS, strict=True)])
    B = torch.cat([f[m][1].double() for f in loras], dim=1)
    return A, B


def errors(loras: list[Factors], results: dict[str, tuple[Factors, dict[str, float]]]
           ) -> tuple[dict[str, float], dict[str, dict[str, float]], float, float]:
    """Global relative error per result, per-module errors, the rank-k floor (global) and max |floor_m|."""
    num = dict.fromkeys(results, 0.0)
    per_module: dict[str, dict[str, float]] = {k: {} for k in results}
    den = tail = 0.0
    for m in loras[0]:
        A, B = exact_factors(loras, m)
        exact = B @ A
        e2 = float(exact.square().sum())
        den += e2
        # singular values of B A = those of B L where L L^T = A A^T (independent of ours' QR route)
        s = torch.linalg.svdvals(B @ torch.linalg.cholesky(A @ A.T))
        tail += float(s[SVD_RANK:].square().sum())
        assert abs(float(s.square().sum()) - e2) <= 1e-9 * e2
        for key, (factors, scales) in results.items():
            Ar, Br = factors[m]
            d2 = float((scales[m] * (Br.double() @ Ar.double()) - exact).square().sum())
            num[key] += d2
            per_module[key][m] = math.sqrt(d2 / e2)
        del exact
    return {k: math.sqrt(v / den) for k, v in num.items()}, per_module, math.sqrt(tail / den), den


# --- one shape set --------------------------------------------------------------------------------------


def run_set(label: str, hidden: int, inter: int, args: argparse.Namespace) -> list[dict]:
    shapes = module_shapes(hidden, inter)
    loras = make_loras(shapes)
    rows: dict[str, dict] = {m: {"set": label, "method": m} for m in METHODS}
    results: dict[str, tuple[Factors, dict[str, float]]] = {}

    # ours: a warm-up, one run for memory, then timed runs (best reported)
    adapters = our_adapters(loras)
    for method in METHODS:
        opts = {"rank": SVD_RANK} if method == "svd" else {}

        def call(method: str = method, opts: dict = opts) -> Adapter:
            return blend(adapters, WEIGHTS, method, **opts)

        call()
        _, peak, out = measure(call, memory=True)
        times = timed_runs(call, args.repeat, args.min_seconds)
        fac = {m: (out.tensors[f"{m}.lora_A"], out.tensors[f"{m}.lora_B"]) for m in shapes}
        results[f"ours/{method}"] = (fac, {m: out.spec.scale(m) for m in shapes})
        rows[method].update(ours_s=min(times), ours_median=statistics.median(times), ours_runs=len(times),
                            ours_peak=peak, ours_rank=out.lora_rank(PREFIX + "mlp.up_proj"),
                            ours_reported=out.extra["blend"].get("relative_error", {}))
        print(f"  ours {label} {method}: best {min(times) * 1e3:.1f} ms, "
              f"median {statistics.median(times) * 1e3:.1f} ms of {len(times)}", file=sys.stderr, flush=True)

    # PEFT: one run for memory and the result, then (cat, linear only) timed runs; best reported
    lora_model, layers = peft_setup(hidden, inter, loras)
    for method in METHODS:
        kw = {"svd_rank": SVD_RANK, "svd_full_matrices": not args.peft_reduced_svd} if method == "svd" else {}
        counter = iter(range(10**6))

        def call(method: str = method, kw: dict = kw, lm: nn.Module = lora_model, counter=counter) -> str:
            new = f"m_{method}_{next(counter)}"
            lm.add_weighted_adapter(["a0", "a1", "a2"], list(WEIGHTS), new, combination_type=method, **kw)
            return new

        dt, peak, new = measure(call, memory=True)
        results[f"peft/{method}"] = peft_result(layers, new)
        rows[method]["peft_rank"] = lora_model.peft_config[new].r
        lora_model.delete_adapter(new)
        times = [dt]
        if method != "svd":
            times += timed_runs(call, 3, args.min_seconds, after=lora_model.delete_adapter)
        rows[method].update(peft_s=min(times), peft_peak=peak, peft_runs=len(times))
        print(f"  peft {label} {method}: best {min(times):.2f} s of {len(times)}", file=sys.stderr, flush=True)
    del lora_model, layers
    gc.collect()
    rows[METHODS[0]]["load"] = os.getloadavg()

    # errors (dense float64, per module)
    glob, per_module, floor, _ = errors(loras, results)
    for method in METHODS:
        row = rows[method]
        row.update(peft_err=glob[f"peft/{method}"], ours_err=glob[f"ours/{method}"],
                   floor=floor if method == "svd" else 0.0)
        if method == "svd":
            pm = per_module["ours/svd"]
            row["ours_reported_max_gap"] = max(abs(pm[m] - row["ours_reported"][m]) for m in pm)
            row["peft_module_max"] = max(per_module["peft/svd"].values())
            row["ours_module_max"] = max(pm.values())
    return list(rows.values())


# --- report ---------------------------------------------------------------------------------------------


def _fmt_t(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_x(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _fmt_mem(mib: float | None) -> str:
    return "n/a" if mib is None else f"{mib:.0f} MiB"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1)
    except (OSError, AttributeError):
        pass
    import peft
    import transformers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}; {os.cpu_count()} logical CPUs ({affinity} usable); torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), peft {peft.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}, {platform.system()}")


def report(rows: list[dict], args: argparse.Namespace, wall: float) -> None:
    print(f"Machine: {machine()}\n")
    print("| shape set (hidden / intermediate) | method | rank out (PEFT / ours) | PEFT time | ours time | speedup "
          "| PEFT rel. error | ours rel. error | rank-16 floor | PEFT peak extra | ours peak extra |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        runs = " (1 run)" if r["peft_runs"] == 1 else ""
        floor = f"{r['floor']:.4e}" if r["method"] == "svd" else "0 (exact)"
        print(f"| {r['set']} | {r['method']} | {r['peft_rank']} / {r['ours_rank']} | {_fmt_t(r['peft_s'])}{runs} "
              f"| {_fmt_t(r['ours_s'])} | {_fmt_x(r['peft_s'] / r['ours_s'])} | {r['peft_err']:.4e} "
              f"| {r['ours_err']:.4e} | {floor} | {_fmt_mem(r['peft_peak'])} | {_fmt_mem(r['ours_peak'])} |")
    print()
    print(f"One decoder layer = 7 modules, fp32, 3 LoRAs r={R} (alphas {', '.join(f'{a:g}' for a in ALPHAS)}), "
          f"weights {list(WEIGHTS)}. Relative error: global over the 7 modules, "
          "sqrt(sum ||R - E||_F^2 / sum ||E||_F^2), E = sum_i w_i s_i B_i A_i in float64.")
    print(f"PEFT svd: svd_rank={SVD_RANK}, svd_full_matrices={not args.peft_reduced_svd}. "
          f"Times: best of >= {args.repeat} runs over >= {args.min_seconds:g} s (ours, after a warm-up and a "
          f"memory run) / of >= 3 runs over >= {args.min_seconds:g} s (PEFT cat, linear) / one run (PEFT svd); "
          "best-of because other processes on the machine make medians noisy. "
          "Peak extra = peak RSS during the call minus RSS before it, after malloc_trim"
          + ("" if PEAK_OK else " (unavailable here: /proc/self/clear_refs not writable)") + ".")
    loads = [f"{r['set']}: {', '.join(f'{x:.2f}' for x in r['load'])}" for r in rows if "load" in r]
    print(f"Load average (1/5/15 min) at start: {', '.join(f'{x:.2f}' for x in args.load0)}; after each set's PEFT "
          f"runs: {'; '.join(loads)}. A load above the torch thread count means the timings were shared with "
          "other work.")
    for r in rows:
        if r["method"] != "svd":
            continue
        goal = r["peft_s"] / r["ours_s"] >= 100 and r["ours_err"] <= r["peft_err"] * (1 + 1e-6)
        print(f"- {r['set']} svd: ours - floor = {r['ours_err'] - r['floor']:+.1e}, PEFT - floor = "
              f"{r['peft_err'] - r['floor']:+.1e}; worst module: ours {r['ours_module_max']:.4e}, PEFT "
              f"{r['peft_module_max']:.4e}; blend()'s own per-module error estimate is within "
              f"{r['ours_reported_max_gap']:.1e} of the measured one. Goal (>= 100x, error <= PEFT's): "
              f"{'met' if goal else 'NOT met'}.")
    print("- linear is not the same operation: PEFT's `linear` blends A and B separately "
          "((sum_i c_i B_i)(sum_i c_i' A_i) with c_i c_i' = w_i s_i), which adds cross terms B_i A_j and keeps "
          "rank r; ours is the exact sum (concatenated factors, rank sum r_i), i.e. PEFT's `cat`.")
    print(f"\nTotal wall time {wall:.0f} s.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the hidden 2048 / intermediate 5632 set")
    p.add_argument("--repeat", type=int, default=10, help="timed runs of ours per method, at least (best reported)")
    p.add_argument("--min-seconds", type=float, default=3.0,
                   help="keep timing ours (and PEFT cat, linear) for at least this long per method")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peft-reduced-svd", action="store_true",
                   help="pass svd_full_matrices=False to PEFT (its default is True)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for label, hidden, inter in SHAPE_SETS[:1] if args.quick else SHAPE_SETS:
        print(f"shape set {label} ...", file=sys.stderr, flush=True)
        rows += run_set(label, hidden, inter, args)
    report(rows, args, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
