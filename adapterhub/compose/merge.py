"""Folding adapters into base weights: W' = W + sum_i w_i s_i B_i A_i (LoRA), W' = W * l (IA3).

Each base tensor is folded on its own (so a checkpoint can be streamed tensor by tensor):
accumulated in float32 with ``addmm_`` (no ``out x in`` temporary per adapter), checked for
NaN/Inf, and rounded once to the base dtype. Prefix tuning and bottleneck adapters add new
computation rather than changing weights; they cannot be folded and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adapterhub.adapter import Adapter
from adapterhub.base import BaseCheckpoint
from adapterhub.compose.checks import check_adapter
from adapterhub.errors import MergeError
from adapterhub.tensorfile import load_tensor

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Fold:
    """One adapter module's contribution to one base tensor."""

    adapter: int  # index into the plan's adapters
    module: str
    weight: float
    role: str  # "lora", "lora_embedding", "lora_bias", "dora", "ia3", "ia3_bias", "replace"


@dataclass
class MergePlan:
    """Which adapter modules fold into which base tensors; built once, applied tensor by tensor."""

    adapters: list[Adapter]
    weights: list[float]
    folds: dict[str, list[Fold]] = field(default_factory=dict)

    def touches(self, name: str) -> bool:
        return name in self.folds


def plan_merge(base: BaseCheckpoint, adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *,
               strict_identity: bool = False) -> MergePlan:
    """Check every adapter against the base and map its modules to base tensor names.

    Order, the same whatever the order of ``adapters``: on each base tensor a saved copy
    (``modules_to_save``) replaces the weight first, then every LoRA delta (and LoRA bias, DoRA) is
    added, then IA3 vectors scale the result: ``(W + sum dW) * l``. That is what merging the LoRA
    adapters with PEFT and then the IA3 adapter into the merged model gives; PEFT defines no order for
    LoRA and IA3 on one module when both are active.

    Raises:
        NonFiniteError: an adapter's weights hold NaN/Inf (named with their count).
        CompatibilityError: an adapter does not fit the base (with its report).
        MergeError: an adapter kind that cannot be folded, or DoRA mixed with other adapters on a module.
    """
    from adapterhub.finite import ensure_finite

    adapters = list(adapters)
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise MergeError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s).\n  fix: give one weight per "
                         "adapter.")
    plan = MergePlan(adapters, weights)
    for i, a in enumerate(adapters):
        label = str(a.source or a.name or f"adapter #{i}")
        if a.kind in ("prefix", "bottleneck"):
            what = "prefix tuning adds virtual tokens" if a.kind == "prefix" else "bottleneck adapters add layers"
            raise MergeError(f"{label}: {what} and cannot be folded into base weights.\n"
                             "  fix: serve it as an adapter (PEFT / the `adapters` library), or export with "
                             "--keep-unmerged to write it beside the merged checkpoint.")
        if a.kind == "ia3" and weights[i] != 1.0:
            raise MergeError(f"{label}: an IA3 adapter folds as a product, so it takes no weight.\n  fix: fold it "
                             "with weight 1, or blend it first (export --method linear; Python: blend()).")
        ensure_finite(a, label=label)
        report = check_adapter(a, base, subject=label, strict_identity=strict_identity, scan_values=False)
        report.raise_for_errors()
        for m in a.modules():
            target = report.resolved[m]
            names = a.module_tensors(m)
            if a.kind == "ia3":
                plan.folds.setdefault(target, []).append(Fold(i, m, weights[i], "ia3"))
                bias = target[: -len(".weight")] + ".bias"
                if not a.spec.is_feedforward(m) and bias in base.tensors:
                    # scaling a module's output scales its bias too (PEFT's IA3 merge and forward)
                    plan.folds.setdefault(bias, []).append(Fold(i, m, weights[i], "ia3_bias"))
                continue
            role = "lora_embedding" if "lora_embedding_A" in names else "lora"
            if "lora_magnitude_vector" in names:
                role = "dora"
                if a.spec.fan_in_fan_out:
                    raise MergeError(f"{label}: DoRA with fan_in_fan_out cannot be folded yet.\n  fix: merge it with "
                                     "PEFT (merge_and_unload).")
            plan.folds.setdefault(target, []).append(Fold(i, m, weights[i], role))
            if "lora_B.bias" in names:
                bias = target[: -len(".weight")] + ".bias"
                if bias not in base.tensors:
                    raise MergeError(f"{label}: {m} has a LoRA bias but the base has no {bias} to fold it into.\n"
                                     "  fix: use the base the adapter was trained on (PEFT refuses this merge too).")
                plan.folds.setdefault(bias, []).append(Fold(i, m, weights[i], "lora_bias"))
        for name in a.carried():
            plan.folds.setdefault(report.resolved[name], []).append(Fold(i, name, weights[i], "replace"))
    for target, folds in plan.folds.items():
        if any(f.role == "dora" for f in folds) and len(folds) > 1:
            raise MergeError(f"{target}: a DoRA adapter renormalises the whole weight; it cannot be folded together "
                             "with other adapters on the same module.\n  fix: export the DoRA adapter alone, then "
                             "export the others onto that checkpoint.")
        if sum(f.role == "replace" for f in folds) > 1:
            raise MergeError(f"{target}: two adapters carry a full copy of it (modules_to_save).\n  fix: export "
                             "them one after the other (the second onto the first's checkpoint).")
        # a carried copy (e.g. PEFT's saved embedding base layer) replaces the weight before deltas apply;
        # LoRA deltas add before IA3 vectors scale, whatever order the adapters came in
        folds.sort(key=lambda f: _FOLD_ORDER[f.role])
    return plan


#: when each fold role applies to a tensor (stable within a role: the order of the adapters)
_FOLD_ORDER = {"replace": 0, "lora": 1, "lora_embedding": 1, "lora_bias": 1, "dora": 1, "ia3": 2, "ia3_bias": 2}

#: float32 rows folded per block: small enough to stay in cache between the copy, addmm_ and rounding
BLOCK_BYTES = 4 << 20


def fold(name: str, weight: torch.Tensor, plan: MergePlan, *, dtype: torch.dtype | None = None,
         out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The base tensor ``name`` with every planned contribution folded in (float32, rounded once).

    Consecutive plain LoRA contributions are folded with one ``addmm_`` of their concatenated
    factors (scales on A), so the weight is traversed once however many adapters touch it; when
    only LoRA touches a weight it is folded in cache-sized row blocks straight into the output.

    Args:
        dtype: the result's dtype (default the weight's); the float32 sum is rounded to it once.
        out: a contiguous tensor of the weight's shape and ``dtype`` to write the result into (a
            streaming caller reuses buffers this way). Without it, a weight nothing folds into is
            returned as is when ``dtype`` matches.
        rows: ``(start, stop)`` when ``weight`` holds only those rows of the 2-d base tensor: every
            fold role works row by row, so a huge tensor can be folded piece by piece.

    Raises:
        MergeError: the float32 result holds NaN/Inf, or rounding it to a narrow ``dtype`` (float16,
            float8) overflows (nothing should be written).
    """
    import torch

    folds = plan.folds.get(name)
    dtype = dtype or weight.dtype
    if not folds:
        if out is None and weight.dtype == dtype:
            return weight
        result = weight.to(dtype) if out is None else out.copy_(weight)
        _check_range(name, result, weight)
        return result
    if rows is not None and (weight.dim() != 2 or rows[1] - rows[0] != weight.shape[0]):
        raise MergeError(f"{name}: rows {rows} do not match a weight piece of shape {tuple(weight.shape)}.")
    if weight.dim() == 2 and all(f.role in ("lora", "lora_embedding") for f in folds):
        if out is None:
            out = torch.empty(weight.shape, dtype=dtype)
        finite, rounds_finite = _addmm_blocked(weight, *_lora_factors(plan, folds, rows), out)
        if finite and not rounds_finite:
            _check_range(name, out, weight)  # raises (its count needs the rounded values)
        checked = True
    else:
        checked = False
        w = _fold_general(name, weight, plan, folds, rows)
        finite = _all_finite(w)
        out = w.to(dtype) if out is None else out.copy_(w)
    if not finite:
        bad = _count_non_finite(out)
        sources = sorted({str(plan.adapters[f.adapter].source or plan.adapters[f.adapter].name) for f in folds})
        where = f" (rows {rows[0]}-{rows[1] - 1})" if rows else ""
        raise MergeError(f"folding into {name} gives {bad} NaN/Inf value(s){where} (from {', '.join(sources)}).\n"
                         "  fix: check the adapter's weights and the blend weights; nothing was written.")
    if not checked:
        _check_range(name, out, weight)
    return out


def _check_range(name: str, result: torch.Tensor, source: torch.Tensor) -> None:
    """Refuse values that overflowed while rounding to a dtype narrower than float32 (float16, float8)."""
    import torch

    if not result.is_floating_point() or torch.finfo(result.dtype).max >= torch.finfo(torch.float32).max:
        return
    if not _all_finite(result) and _all_finite(source):
        raise MergeError(f"{name}: {_count_non_finite(result)} value(s) overflow {result.dtype} (largest "
                         f"{torch.finfo(result.dtype).max:g}) when rounded.\n  fix: export as bfloat16 or float32 "
                         "(--dtype); nothing was written.")


def _lora_factors(plan: MergePlan, folds: list[Fold], rows: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with ``W + left @ right`` the sum of the folds (plain LoRA / embedding LoRA only);
    ``left`` holds only ``rows`` when given."""
    import torch

    pick = slice(*rows) if rows else slice(None)
    lefts, rights = [], []
    for f in folds:
        a = plan.adapters[f.adapter]
        names, t = a.module_tensors(f.module), a.tensors
        scale = a.spec.scale(f.module) * f.weight
        if f.role == "lora_embedding":  # W (vocab x dim) += scale * A^T B^T
            lefts.append(t[names["lora_embedding_A"]].T[pick].to(torch.float32))
            rights.append(t[names["lora_embedding_B"]].to(torch.float32).T * scale)
            continue
        A, B = t[names["lora_A"]], t[names["lora_B"]]
        if a.spec.fan_in_fan_out:
            A, B = B.T, A.T
        lefts.append(B[pick].to(torch.float32))
        rights.append(A.to(torch.float32) * scale)
    return torch.cat(lefts, dim=1).contiguous(), torch.cat(rights, dim=0).contiguous()


def _addmm_blocked(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor
                   ) -> tuple[bool, bool]:
    """``out = weight + left @ right``, computed in float32 one row block at a time and rounded to ``out``;
    whether every float32 value was finite, and whether every one stays finite rounded to ``out``'s
    dtype (rounding is monotonic, so the smallest and largest value of each block decide it)."""
    import torch

    rows, cols = weight.shape
    if left.shape != (rows, right.shape[0]) or right.shape[1] != cols or out.shape != weight.shape:
        raise MergeError(f"LoRA factors {tuple(left.shape)} @ {tuple(right.shape)} do not fit a weight of shape "
                         f"{(rows, cols)}.")
    dtype = out.dtype
    step = max(1, BLOCK_BYTES // (4 * max(cols, 1)))
    scratch = None if dtype == torch.float32 else torch.empty((min(step, rows), cols), dtype=torch.float32)
    narrow = out.is_floating_point() and torch.finfo(dtype).max < torch.finfo(torch.float32).max
    finite = rounds_finite = True
    for i in range(0, rows, step):
        j = min(i + step, rows)
        block = out[i:j] if scratch is None else scratch[: j - i]
        block.copy_(weight[i:j])
        block.addmm_(left[i:j], right)
        if block.numel():  # checked while the block is in cache
            lo, hi = torch.aminmax(block)
            finite = bool(torch.isfinite(lo) & torch.isfinite(hi)) and finite
            if narrow and finite:
                rounds_finite = bool(torch.isfinite(torch.stack((lo, hi)).to(dtype).float()).all()) and rounds_finite
        if scratch is not None:
            out[i:j].copy_(block)
    return finite, rounds_finite


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t`` (one pass: min and max propagate NaN and reach +-Inf; no boolean temporary)."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8: few CPU kernels
        t = t.to(torch.float32)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _count_non_finite(t: torch.Tensor) -> int:
    import torch

    return int((~torch.isfinite(t.to(torch.float32) if t.element_size() == 1 else t)).sum())


def _fold_general(name: str, weight: torch.Tensor, plan: MergePlan, folds: list[Fold],
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Every fold role (IA3, DoRA, biases, carried copies) on a float32 copy of the weight (of its
    ``rows`` when given: each role acts row by row)."""
    import torch

    pick = slice(*rows) if rows else slice(None)
    w = weight.to(torch.float32, copy=True)
    pending: list[Fold] = []  # plain LoRA folds, applied together

    def flush() -> None:
        if pending:
            left, right = _lora_factors(plan, pending, rows)
            w.addmm_(left, right)
            pending.clear()

    for f in folds:
        a = plan.adapters[f.adapter]
        t = a.tensors
        if f.role == "replace":
            flush()
            w = t[f.module][pick].to(torch.float32, copy=True)
            continue
        names = a.module_tensors(f.module)
        if f.role == "ia3":
            flush()
            vec = t[names["ia3_l"]].to(torch.float32)
            vec = vec.T if a.spec.fan_in_fan_out else vec
            w.mul_(vec[pick] if vec.dim() == 2 and vec.shape[0] > 1 else vec)  # (out, 1) scales rows
            continue
        if f.role == "ia3_bias":  # an output-side vector (out, 1) scales the bias (out,)
            w.mul_(t[names["ia3_l"]].to(torch.float32).reshape(-1)[pick])
            continue
        if f.role == "lora_bias":
            w.add_(t[names["lora_B.bias"]].to(torch.float32), alpha=a.spec.scale(f.module) * f.weight)
            continue
        if w.dim() != 2:
            raise MergeError(f"{name}: folding LoRA into a {w.dim()}-d weight (convolution) is not supported.\n"
                             "  fix: merge it with PEFT (merge_and_unload).")
        pending.append(f)
        if f.role == "dora":
            flush()
            magnitude = t[names["lora_magnitude_vector"]][pick].to(torch.float32)
            norm = torch.linalg.vector_norm(w, dim=1)
            w.mul_((magnitude / norm).unsqueeze(1))
    flush()
    return w


def merge_into(base: BaseCheckpoint, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
               ) -> dict[str, torch.Tensor]:
    """Every base tensor with the adapters folded in, as a state dict (loads the whole base: for large
    models, stream with :func:`plan_merge` and :func:`fold` per tensor instead)."""
    plan = plan_merge(base, adapters, weights)
    return {name: fold(name, load_tensor(info, cached=False), plan) for name, info in sorted(base.tensors.items())}


def merge_state_dict(state: Mapping[str, torch.Tensor], plan: MergePlan) -> dict[str, torch.Tensor]:
    """Apply a plan to tensors already in memory."""
    return {name: fold(name, t, plan) for name, t in state.items()}
