"""Blending and stacking adapters: one small function per method, chosen from one table.

LoRA methods work module by module on factors and never build an ``out x in`` matrix unless the
method is defined on dense deltas (ties, dare, magnitude pruning). Every LoRA result has scale 1
(``alpha == r`` per module), so nothing downstream can apply a scale twice; ranks that differ per
module go to exact ``rank_pattern``/``alpha_pattern`` keys, so the result reloads in PEFT as is.

========================  ============================================================================
method                    result
========================  ============================================================================
``linear`` / ``cat``      sum_i w_i s_i B_i A_i exactly, as concatenated factors (rank sum r_i)
``svd``                   best rank-k approximation of that sum (thin QRs + an SVD of a sum(r_i)^2 core)
``ties``                  TIES: magnitude-prune each dense delta, elect signs, disjoint mean; rank k
``dare_linear``           DARE: random drop + rescale each delta, weighted sum; rank k (seeded)
``dare_ties``             DARE drop + TIES sign election; rank k (seeded)
``magnitude_prune``       magnitude-prune each delta, weighted sum; rank k
========================  ============================================================================

IA3 blends are weighted sums of the scaling vectors (as PEFT's ``add_weighted_adapter``); bottleneck
adapters are weighted *parameter* averages (identical configs required: this averages weights, not
outputs) and prefixes weighted averages of the materialised prefix values (equal lengths required),
both with the weights normalised to sum to 1 as the ``adapters`` library's ``average_adapter`` does by
default: ``blend([a, a])`` is ``a``, and weights (2, 1) mean (2/3, 1/3).

Every input is scanned for NaN/Inf first (:class:`~adapterhub.errors.NonFiniteError`), and every
result is checked to be finite before it is returned.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.adapter import Adapter, BaseModelRef, IA3Spec, LoraSpec, PrefixSpec, Tensors
from adapterhub.compose.checks import check_composable
from adapterhub.errors import BlendError, BlendOptionError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Option:
    """One option of a blend method: its name, type, default and help. The CLI builds its flags from
    these, recipes are validated with them, and the docs list them.

    ``default`` None means "computed from the inputs" (``help`` says how).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    #: what the default is when ``default`` is None (computed from the inputs)
    default_help: str = ""
    #: the valid range of a number: ``minimum`` (excluded if ``exclusive_minimum``) to ``maximum``
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    @property
    def default_text(self) -> str:
        return self.default_help if self.default is None else str(self.default)

    def coerce(self, value: Any, method: str) -> Any:
        """``value`` checked against the type and choices (an int is a valid float, a bool is no number).

        Raises:
            BlendOptionError: naming the method, the option and what it takes.
        """
        want = {int: "an integer", float: "a number", str: "a string"}[self.type]
        ok = isinstance(value, self.type) and not isinstance(value, bool)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise BlendOptionError(f"option {self.name} of blend method {method!r} must be {want}, not {value!r}.\n"
                                   f"  fix: {self.name}: {self.help}.")
        if self.type is float and not math.isfinite(value):
            raise BlendOptionError(f"option {self.name} of blend method {method!r} must be finite, not {value!r}.\n"
                                   f"  fix: give {self.name} a number.")
        if self.choices and value not in self.choices:
            raise BlendOptionError(f"option {self.name} of blend method {method!r} must be one of "
                                   f"{', '.join(self.choices)}, not {value!r}.\n  fix: {self.name}: {self.help}.")
        low = self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum)
        if low or (self.maximum is not None and value > self.maximum):
            raise BlendOptionError(f"option {self.name} of blend method {method!r} is {value!r}, out of range.\n"
                                   f"  fix: {self.name}: {self.help}.")
        return value


RANK = Option("rank", int, None, "target rank of every module, at least 1", default_help="the largest input rank",
              minimum=1)
DENSITY = Option("density", float, 0.5, "fraction of each delta's values kept, in (0, 1]", minimum=0.0,
                 exclusive_minimum=True, maximum=1.0)
SEED = Option("seed", int, 0, "seed of the random drops (the same seed gives the same result)")
MAJORITY_SIGN = Option("majority_sign_method", str, "total", "how each value's sign is elected: total (sign of "
                       "the weighted sum) or frequency (the more frequent sign)", choices=("total", "frequency"))


@dataclass(frozen=True)
class Method:
    """A blend method: its function, the adapter kinds it accepts and its options."""

    name: str
    fn: Callable[..., Adapter]
    kinds: frozenset[str]
    options: tuple[Option, ...]
    summary: str

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def validate(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` checked against this method's table (names, types, choices), values coerced.

        Raises:
            BlendOptionError: an option this method does not take (listing those it takes) or a bad value.
        """
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise BlendOptionError(
                f"blend method {self.name!r} takes no option(s) {', '.join(unknown)}; it takes: "
                f"{', '.join(self.option_names) or 'none'}.\n  fix: drop them, or choose a method that takes them "
                f"({_takers(unknown)}).")
        by_name = {o.name: o for o in self.options}
        return {k: by_name[k].coerce(v, self.name) for k, v in options.items()}


METHODS: dict[str, Method] = {}


def _takers(names: Sequence[str]) -> str:
    """Which methods take all of ``names``, for a fix line."""
    takers = [m.name for m in METHODS.values() if set(names) <= set(m.option_names)]
    return ", ".join(takers) if takers else "no method takes them all"


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every option of every method, in table order, with the methods that take it (what the CLI offers)."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for m in METHODS.values():
        for o in m.options:
            known, takers = out.setdefault(o.name, (o, []))
            if known != o:
                raise ValueError(f"blend option {o.name!r} is declared differently by two methods")
            takers.append(m.name)
    return out


def method(name: str, *, kinds: Sequence[str], options: Sequence[Option] = (), summary: str = "") -> Callable:
    """Register a blend method; registering a name twice, or an option that is not a keyword-only
    parameter of the function with the same default, is an error."""

    def deco(fn: Callable[..., Adapter]) -> Callable[..., Adapter]:
        if name in METHODS:
            raise ValueError(f"blend method {name!r} is registered twice")
        params = inspect.signature(fn).parameters
        for o in options:
            p = params.get(o.name)
            if p is None or p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default != o.default:
                raise ValueError(f"blend method {name!r}: option {o.name!r} must be a keyword-only parameter "
                                 f"of {fn.__name__} with default {o.default!r}")
        METHODS[name] = Method(name, fn, frozenset(kinds), tuple(options), summary)
        return fn

    return deco


# --- helpers ---------------------------------------------------------------------------------------


@dataclass
class _Factors:
    """One module of one adapter: A (r x in), B (out x r), its scale and blend weight.

    The factors are read (and widened to float64) only when a method reaches this module, so a blend
    never holds more than one module's float64 copies.
    """

    tensors: Tensors
    a_name: str
    b_name: str
    scale: float
    weight: float

    @property
    def A(self) -> torch.Tensor:
        return self.tensors[self.a_name].double()

    @property
    def B(self) -> torch.Tensor:
        return self.tensors[self.b_name].double()

    @property
    def rank(self) -> int:
        return self.tensors.shape(self.a_name)[0]


def _lora_modules(adapters: Sequence[Adapter], weights: Sequence[float]
                  ) -> tuple[dict[str, list[_Factors]], dict[str, str], dict[str, torch.dtype]]:
    """module -> factors (read lazily, in float64 for exactness of the small math), role prefix, dtype."""
    import torch

    from adapterhub.dtypes import st_to_torch

    modules: dict[str, list[_Factors]] = {}
    roles: dict[str, str] = {}
    dtypes: dict[str, torch.dtype] = {}
    for a, w in zip(adapters, weights, strict=True):
        saved = [n for n in a.carried() if not n.endswith(".base_layer.weight")]  # base layers: see _lora_result
        if saved:
            raise BlendError(f"{a.source or a.name}: modules_to_save copies ({', '.join(saved[:3])}) cannot "
                             "be blended.\n  fix: blend adapters without them (export folds them in instead).")
        for m in a.modules():
            names = a.module_tensors(m)
            role = "lora_embedding_" if "lora_embedding_A" in names else "lora_"
            if roles.setdefault(m, role) != role:
                raise BlendError(f"{m}: an embedding LoRA and a linear LoRA cannot be blended.\n  fix: blend adapters "
                                 "made for the same kind of layer.")
            if "lora_B.bias" in names:
                raise BlendError(f"{m}: LoRA bias (lora_bias=True) cannot be blended.\n  fix: export the adapters "
                                 "(each SRC=WEIGHT folds into the base) instead of blending them.")
            a_name, b_name = names[role + "A"], names[role + "B"]
            ndim = len(a.tensors.shape(a_name))
            if ndim != 2:
                raise BlendError(f"{m}: only 2-d (linear, embedding) LoRA can be blended, not {ndim}-d.\n  fix: "
                                 "blend adapters of linear or embedding layers only.")
            a_dtype = st_to_torch(a.tensors.dtype(a_name))
            dtypes.setdefault(m, a_dtype)
            if dtypes[m] != a_dtype or a.tensors.dtype(b_name) != a.tensors.dtype(a_name):
                dtypes[m] = torch.float32
            modules.setdefault(m, []).append(_Factors(a.tensors, a_name, b_name, a.spec.scale(m), float(w)))
    return modules, roles, dtypes


def _lora_result(adapters: Sequence[Adapter], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 roles: dict[str, str], dtypes: dict[str, torch.dtype], extra: dict[str, Any]) -> Adapter:
    """An Adapter of scale 1 per module from final (A, B) factors."""
    import torch

    tensors = {}
    ranks = {}
    for m, (A, B) in factors.items():
        tensors[f"{m}.{roles[m]}A"] = A.to(dtypes[m]).contiguous()
        tensors[f"{m}.{roles[m]}B"] = B.to(dtypes[m]).contiguous()
        ranks[m] = A.shape[0]
    for a in adapters:  # PEFT saves an embedding LoRA's base layer: the base's weight, the same in every input
        for n in a.carried():
            t = a.tensors[n]
            if n in tensors and not torch.equal(tensors[n], t):
                raise BlendError(f"{n}: the adapters carry different copies of this base layer (made on "
                                 "differently resized bases); they cannot be blended.\n  fix: blend adapters made on "
                                 "the same base.")
            tensors[n] = t
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    first = adapters[0]
    spec = LoraSpec(r=r, alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=None,
                    fan_in_fan_out=first.spec.fan_in_fan_out)
    return Adapter(kind="lora", spec=spec, tensors=Tensors(tensors), base=_base(adapters),
                   extra={"blend": extra})


def _base(adapters: Sequence[Adapter]) -> BaseModelRef:
    first = adapters[0].base
    fps = [a.base.fingerprint for a in adapters if a.base.fingerprint]
    types = [a.base.model_type for a in adapters if a.base.model_type]
    archs = [a.base.architectures for a in adapters if a.base.architectures]
    return BaseModelRef(name_or_path=first.name_or_path, revision=first.revision,
                        fingerprint=fps[0] if fps else None, model_type=types[0] if types else None,
                        architectures=archs[0] if archs else None)


def _concat(fs: list[_Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i w_i s_i B_i A_i as one factor pair: weights and scales on A, as PEFT's cat does."""
    import torch

    A = torch.cat([f.A * (f.weight * f.scale) for f in fs], dim=0)
    B = torch.cat([f.B for f in fs], dim=1)
    return A, B


def _truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of B @ A without forming it: QR of B and A^T, SVD of the small core.

    Returns (A_k, B_k, relative Frobenius error of the truncation).
    """
    import torch

    Qb, Rb = torch.linalg.qr(B)            # out x R, R x R
    Qa, Ra = torch.linalg.qr(A.T)          # in x R,  R x R
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # R x R core
    k = min(k, S.numel())
    total = float(S.square().sum())
    err = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    B_k = (Qb @ U[:, :k]) * S[:k]           # singular values on B, as PEFT's svd does
    A_k = Vh[:k] @ Qa.T
    return A_k, B_k, err


def _dense_truncate(D: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    import torch

    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = min(k, S.numel())
    total = float(S.square().sum())
    err = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    return Vh[:k], U[:, :k] * S[:k], err


def _default_rank(fs_by_module: dict[str, list[_Factors]], rank: int | None) -> int:
    if rank is not None:
        if rank < 1:
            raise BlendError(f"rank must be >= 1, not {rank}.\n  fix: pass --rank 1 or more.")
        return rank
    return max(f.rank for fs in fs_by_module.values() for f in fs)


# --- LoRA methods ----------------------------------------------------------------------------------


@method("linear", kinds=["lora", "ia3", "bottleneck", "prefix"],
        summary="exact weighted sum (LoRA: concatenated factors, no cross terms)")
def linear(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    kind = adapters[0].kind
    if kind == "ia3":
        return _ia3_sum(adapters, weights)
    if kind == "bottleneck":
        return _param_average(adapters, weights)
    if kind == "prefix":
        return _prefix_average(adapters, weights)
    modules, roles, dtypes = _lora_modules(adapters, weights)
    factors = {m: tuple(t.to(dtypes[m]) for t in _concat(fs)) for m, fs in modules.items()}
    return _lora_result(adapters, factors, roles, dtypes, {"method": "linear", "relative_error": {}})


@method("cat", kinds=["lora"], summary="PEFT's name for linear: concatenated factors, rank = sum of ranks")
def cat(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    result = linear(adapters, weights)
    return result.replace(extra={"blend": {"method": "cat", "relative_error": {}}})


@method("svd", kinds=["lora"], options=(RANK,),
        summary="best rank-k approximation of the exact sum, without building out x in matrices")
def svd(adapters: Sequence[Adapter], weights: Sequence[float], *, rank: int | None = None) -> Adapter:
    modules, roles, dtypes = _lora_modules(adapters, weights)
    k = _default_rank(modules, rank)
    factors, errors = {}, {}
    for m, fs in modules.items():
        A, B = _concat(fs)
        A_k, B_k, errors[m] = _truncate(A, B, k)
        factors[m] = (A_k.to(dtypes[m]), B_k.to(dtypes[m]))
    return _lora_result(adapters, factors, roles, dtypes, {"method": "svd", "rank": k, "relative_error": errors})


def _task_kernel(deltas: list[torch.Tensor], weights: list[float], *, density: float, prune: str | None,
                 sign: str | None, generator: torch.Generator | None) -> torch.Tensor:
    """Generalised task arithmetic on dense deltas: prune each (magnitude or random drop with rescale),
    weight, then optionally elect a majority sign and average the agreeing entries (TIES). The sign
    is elected from the *weighted* deltas, so a weight of 0 removes an input entirely (PEFT's
    merge_utils elects it from the unweighted ones)."""
    import torch

    if not 0.0 < density <= 1.0:
        raise BlendError(f"density must be in (0, 1], not {density}.\n  fix: pass --density between 0 and 1.")
    pruned = []
    for d in deltas:
        if prune == "magnitude" and density < 1.0:
            k = int(density * d.numel())
            mask = torch.zeros(d.numel(), dtype=d.dtype)
            mask[torch.topk(d.abs().reshape(-1), k=k).indices] = 1
            d = d * mask.reshape(d.shape)
        elif prune == "random" and density < 1.0:
            keep = torch.rand(d.shape, generator=generator, dtype=torch.float64) < density
            d = d * keep / density
        pruned.append(d)
    stacked = torch.stack(pruned)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if sign is None:
        return weighted.sum(0)
    magnitude = weighted.sum(0) if sign == "total" else weighted.sign().sum(0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = weighted.sign() == majority
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


_PRESETS = {
    "ties": dict(prune="magnitude", sign="total"),
    "dare_linear": dict(prune="random", sign=None),
    "dare_ties": dict(prune="random", sign="total"),
    "magnitude_prune": dict(prune="magnitude", sign=None),
}


def _dense_method(name: str) -> Callable[..., Adapter]:
    preset = _PRESETS[name]

    def run(adapters: Sequence[Adapter], weights: Sequence[float], *, rank: int | None = None,
            density: float = 0.5, seed: int = 0, majority_sign_method: str = "total") -> Adapter:
        import torch

        if majority_sign_method not in ("total", "frequency"):
            raise BlendError("majority_sign_method must be 'total' or 'frequency'.\n  fix: pass one of them.")
        modules, roles, dtypes = _lora_modules(adapters, weights)
        k = _default_rank(modules, rank)
        generator = torch.Generator().manual_seed(seed)
        factors, errors = {}, {}
        for m in sorted(modules):  # fixed order: the random masks depend only on the seed
            fs = modules[m]
            deltas = [(f.B @ f.A) * f.scale for f in fs]
            dense = _task_kernel(deltas, [f.weight for f in fs], density=density, prune=preset["prune"],
                                 sign=preset["sign"] and majority_sign_method, generator=generator)
            A_k, B_k, errors[m] = _dense_truncate(dense, k)
            factors[m] = (A_k, B_k)
        return _lora_result(adapters, factors, roles, dtypes,
                            {"method": name, "rank": k, "density": density, "seed": seed, "relative_error": errors})

    run.__name__ = name
    run.__doc__ = f"{name} on dense per-module deltas, then re-factored to rank k (seeded, reproducible)."
    return run


# each preset takes exactly the options it uses: a seed only where values are dropped at random, a
# sign election method only where signs are elected
for _name, _options, _summary in (
        ("ties", (RANK, DENSITY, MAJORITY_SIGN), "TIES merging on dense deltas, re-factored to rank k"),
        ("dare_linear", (RANK, DENSITY, SEED), "DARE (random drop + rescale) then weighted sum, rank k; seeded"),
        ("dare_ties", (RANK, DENSITY, SEED, MAJORITY_SIGN), "DARE then TIES sign election, rank k; seeded"),
        ("magnitude_prune", (RANK, DENSITY), "magnitude pruning then weighted sum, rank k")):
    method(_name, kinds=["lora"], options=_options, summary=_summary)(_dense_method(_name))


# --- other kinds -----------------------------------------------------------------------------------


def _ia3_sum(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    import torch

    shapes = {a.module_tensors(m)["ia3_l"]: a.tensors.shape(a.module_tensors(m)["ia3_l"])
              for a in adapters for m in a.modules()}
    out: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights, strict=True):
        own = {a.module_tensors(m)["ia3_l"] for m in a.modules()}
        for name, shape in shapes.items():  # a module an adapter does not scale has the identity vector
            v = (a.tensors[name].double() if name in own else torch.ones(shape, dtype=torch.float64)) * w
            out[name] = out[name] + v if name in out else v
    return _ia3_result(adapters, out, "linear")


def _ia3_result(adapters: Sequence[Adapter], vectors: dict[str, torch.Tensor], method: str) -> Adapter:
    """An IA3 adapter from combined vectors, in the first input's dtype, feed-forward sides kept."""
    first = adapters[0]
    dtype = first.tensors[next(iter(first.tensors))].dtype
    ff = sorted({m for a in adapters for m in a.modules() if a.spec.is_feedforward(m)})
    spec = IA3Spec(target_modules=None, feedforward_modules=tuple(ff), fan_in_fan_out=first.spec.fan_in_fan_out)
    return Adapter(kind="ia3", spec=spec, tensors=Tensors({k: v.to(dtype) for k, v in vectors.items()}),
                   base=_base(adapters), extra={"blend": {"method": method}})


def normalized(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum, as the ``adapters`` library's ``average_adapter(normalize_weights=True)``.

    Raises:
        BlendError: the weights sum to 0 (an average of them is undefined).
    """
    total = math.fsum(weights)
    if total == 0.0:
        raise BlendError(f"weights {list(weights)} sum to 0, so they cannot be normalised into an average; "
                         "bottleneck and prefix blends average their inputs with weights that sum to 1.")
    return [w / total for w in weights]


def _param_average(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    first = adapters[0]
    weights = normalized(weights)
    out = {}
    for name in first.tensors:
        acc = sum(a.tensors[name].double() * w for a, w in zip(adapters, weights, strict=True))
        out[name] = acc.to(first.tensors[name].dtype)
    return first.replace(tensors=Tensors(out), base=_base(adapters), extra={
        **{k: v for k, v in first.extra.items() if k != "blend"},
        "blend": {"method": "linear", "normalized_weights": weights}})


def _prefix_average(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    from adapterhub.formats.adapters_lib import prefix_values

    weights = normalized(weights)
    values = [prefix_values(a) for a in adapters]
    acc = sum(v.double() * w for v, w in zip(values, weights, strict=True))
    spec = adapters[0].spec
    out_spec = PrefixSpec(num_virtual_tokens=spec.num_virtual_tokens, width=spec.width, num_layers=spec.num_layers,
                          num_kv_heads=spec.num_kv_heads, token_dim=spec.token_dim, layout="peft")
    return Adapter(kind="prefix", spec=out_spec, tensors=Tensors({"prompt_embeddings": acc.to(values[0].dtype)}),
                   base=_base(adapters), extra={"blend": {"method": "linear", "normalized_weights": weights}})


# --- entry points ----------------------------------------------------------------------------------


def _inputs_finite(adapters: Sequence[Adapter], labels: Sequence[str] | None) -> None:
    """NaN/Inf in any input stops a blend before anything is computed (an SVD of them fails, a sum spreads them)."""
    from adapterhub.finite import ensure_finite

    for i, a in enumerate(adapters):
        ensure_finite(a, label=labels[i] if labels else None)


def _result_finite(result: Adapter, method: str) -> None:
    """Finite inputs can still overflow (huge weights): the result is checked before anyone writes it."""
    from adapterhub.finite import scan

    bad = scan(result.tensors)
    if bad:
        from adapterhub.finite import non_finite_error

        raise non_finite_error(bad, f"the {method} blend's result", fix="finite inputs overflowed the result's "
                               "dtype: use smaller blend weights")


def blend(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, method: str = "linear", *,
          labels: Sequence[str] | None = None, **options: Any) -> Adapter:
    """Blend adapters of one kind with per-adapter weights (negative weights negate a task).

    The compatibility check runs first; an incompatible set raises its report. The result's
    ``extra["blend"]`` records the method, options and, where factors were truncated, each
    module's relative Frobenius error. ``labels`` name the adapters in error reports.

    Example:
        >>> merged = blend([a, b], [0.7, 0.3], "svd", rank=16)      # doctest: +SKIP
        >>> merged.extra["blend"]["relative_error"]                 # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj': 0.0123, ...}

    Raises:
        BlendError: unknown method (the message lists the valid ones), wrong options or weights.
        CompatibilityError: the adapters do not fit together.
    """
    if method not in METHODS:
        raise BlendOptionError(f"unknown blend method {method!r}; choose one of: {', '.join(sorted(METHODS))}.\n"
                               "  fix: pick one of them (the README's blend table says what each does).")
    spec = METHODS[method]
    adapters = list(adapters)
    if not adapters:
        raise BlendError("blend needs at least one adapter.\n  fix: give one or more adapters.")
    if weights is not None and any(isinstance(w, bool) for w in weights):
        raise BlendError(f"weights must be numbers, not booleans ({list(weights)}).\n  fix: give numbers, e.g. "
                         "0.7, 0.3.")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise BlendError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s).\n  fix: give one weight per "
                         "adapter.")
    if not all(math.isfinite(w) for w in weights):
        raise BlendError("weights must be finite numbers.\n  fix: give numbers such as 0.7, 0.3.")
    options = spec.validate(options)
    kind = adapters[0].kind
    if kind not in spec.kinds:
        raise BlendError(f"method {method!r} does not blend {kind} adapters.\n  fix: for {kind} use: "
                         f"{', '.join(sorted(n for n, m in METHODS.items() if kind in m.kinds))}.")
    check_composable(adapters, mode="blend", names=labels).raise_for_errors()
    _inputs_finite(adapters, labels)
    result = spec.fn(adapters, weights, **options)
    _result_finite(result, method)
    info = dict(result.extra.get("blend") or {})
    info.update({"weights": weights, "options": options})
    return result.replace(extra={**result.extra, "blend": info})


def stack(adapters: Sequence[Adapter], *, labels: Sequence[str] | None = None) -> Adapter:
    """Several adapters active at once, as one: LoRA = sum of deltas, IA3 = elementwise product of the
    scaling vectors, prefix = concatenation along the virtual-token axis. Bottleneck adapters stack
    sequentially at run time only and are refused here."""
    import torch

    adapters = list(adapters)
    check_composable(adapters, mode="stack", names=labels).raise_for_errors()
    _inputs_finite(adapters, labels)
    kind = adapters[0].kind
    if kind == "lora":
        out = linear(adapters, [1.0] * len(adapters))
        return out.replace(extra={"blend": {"method": "stack"}})
    if kind == "ia3":
        vectors: dict[str, torch.Tensor] = {}
        for a in adapters:
            for m in a.modules():
                name = a.module_tensors(m)["ia3_l"]
                v = a.tensors[name].double()
                vectors[name] = vectors[name] * v if name in vectors else v
        return _ia3_result(adapters, vectors, "stack")
    if kind == "prefix":
        from adapterhub.formats.adapters_lib import prefix_values

        values = torch.cat([prefix_values(a) for a in adapters], dim=0)
        s = adapters[0].spec
        spec = PrefixSpec(num_virtual_tokens=values.shape[0], width=s.width, num_layers=s.num_layers,
                          num_kv_heads=s.num_kv_heads, token_dim=s.token_dim, layout="peft")
        return Adapter(kind="prefix", spec=spec, tensors=Tensors({"prompt_embeddings": values.contiguous()}),
                       base=_base(adapters), extra={"blend": {"method": "stack"}})
    raise BlendError("bottleneck adapters stack sequentially and only at run time.\n  fix: blend them instead, or "
                     "attach a Stack at run time (adapterhub.attach).")
