"""LoRA at run time: the deltas of every active LoRA of one module, computed as one factor pair.

A composition reduces, per module, to terms ``c_i * s_i * B_i A_i`` (``c_i`` the composition's factor,
``s_i`` the adapter's scale: alpha/r, rsLoRA, rank/alpha patterns). :func:`concat_plan` folds them into
one pair, ``A = [A_1; ...; A_n]`` (R x in) and ``B = [c_1 s_1 B_1, ..., c_n s_n B_n]`` (out x R), so the
module computes ``y += (x @ A^T) @ B^T``: four rank-r LoRAs cost what one rank-4r LoRA costs, one pair
of matmuls instead of one per adapter, and nothing ``out x in`` is ever formed. Folding is done in
float32 and rounded once to the model's dtype.

Extension point (the multi-tenant pool, a different adapter per batch row): the per-module forward
(:class:`adapterhub.runtime.linear.LinearSite`) calls ``site.lora.add_to(x, y)`` and knows nothing
else of the plan. A second plan class with the same method, holding fixed-shape slot buffers
``A_slots [slots, max_rank, in]`` / ``B_slots [slots, out, max_rank]`` (zero-padded ranks, scales folded
into B as here) and a per-row slot index set before each forward, computes
``y += bmm(bmm(x, A_slots[idx]^T), B_slots[idx]^T)`` (a gather and two batched matmuls). Loading an
adapter into a slot writes into those buffers; swapping the plan object on a site is one attribute
assignment, so neither the site nor the module is re-wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LoraTerm:
    """One adapter's contribution to one module: factors and the total factor (composition x scale)."""

    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r
    factor: float
    bias: torch.Tensor | None = None  # out (PEFT lora_bias), scaled like B


class ConcatPlan:
    """Every term of one module folded into one factor pair (scales and weights inside ``bt``)."""

    __slots__ = ("a", "bt", "bias", "rank")

    def __init__(self, a: torch.Tensor, bt: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.a = a  # R x in
        self.bt = bt  # R x out, contiguous: the right operand of addmm
        self.bias = bias
        self.rank = a.shape[0]

    def add_to(self, x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``y + (x @ A^T) @ B^T (+ bias)``; into ``y`` itself when ``inplace`` (no autograd, contiguous)."""
        if x.dtype != self.a.dtype:
            x = x.to(self.a.dtype)
        xa = F.linear(x, self.a)
        if inplace and y.dtype == self.bt.dtype and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(xa.view(-1, self.rank), self.bt)
            if self.bias is not None:
                y.add_(self.bias)
            return y
        delta = xa @ self.bt
        if self.bias is not None:
            delta = delta + self.bias
        return y + delta.to(y.dtype)

    @property
    def nbytes(self) -> int:
        n = self.a.numel() * self.a.element_size() + self.bt.numel() * self.bt.element_size()
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)


def concat_plan(terms: list[LoraTerm], *, dtype: torch.dtype, device: torch.device) -> ConcatPlan | None:
    """Fold ``terms`` into one :class:`ConcatPlan` in ``dtype`` on ``device``; None when every factor is 0."""
    terms = [t for t in terms if t.factor != 0.0]
    if not terms:
        return None
    a = torch.cat([t.a.to(device=device, dtype=torch.float32) for t in terms], dim=0)
    bt = torch.cat([(t.b.to(device=device, dtype=torch.float32) * t.factor).t() for t in terms], dim=0)
    biases = [t.bias.to(device=device, dtype=torch.float32) * t.factor for t in terms if t.bias is not None]
    bias = torch.stack(biases).sum(0).to(dtype) if biases else None
    return ConcatPlan(a.to(dtype).contiguous(), bt.to(dtype).contiguous(), bias)


def dense_delta(terms: list[LoraTerm], *, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``Σ factor * B @ A`` (out x in) and the summed bias, in float32: only for folding into a weight copy."""
    delta = bias = None
    for t in terms:
        if t.factor == 0.0:
            continue
        d = (t.b.to(device=device, dtype=torch.float32) * t.factor) @ t.a.to(device=device, dtype=torch.float32)
        delta = d if delta is None else delta + d
        if t.bias is not None:
            b = t.bias.to(device=device, dtype=torch.float32) * t.factor
            bias = b if bias is None else bias + b
    return delta, bias
