"""The forward of one Linear-like module while a composition is attached.

:class:`LinearSite` is installed as the module's instance ``forward`` (the class's forward, the
module's parameters, their identities and ``state_dict()`` keys stay as they are) and computes

    y = (W (x * v_in) + b) * v_out + LoRA(x)

with ``v_in``/``v_out`` the IA3 vectors of the composition (None when absent) and ``LoRA`` the plan of
:mod:`adapterhub.runtime.lora` (it reads the unscaled input). With ``merge=True`` the site holds a
merged copy ``W' = diag(v_out) W diag(v_in) + Σ c s B A`` instead (float32, rounded once) and runs one
plain linear; the base weight itself is never written.

Detaching removes the instance attribute (or restores the one that was there, e.g. accelerate's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime.lora import ConcatPlan
from adapterhub.runtime.override import ForwardOverride


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _scale(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``t * v`` computed in ``v``'s dtype (float32) and returned in ``t``'s, as PEFT's IA3 does."""
    return t * v if t.dtype == v.dtype else (t.to(v.dtype) * v).to(t.dtype)


class LinearSite(ForwardOverride):
    """IA3 scaling and the LoRA delta of one module; every field may be None (the site then passes through)."""

    kind = "linear"

    def __init__(self, module: nn.Module, path: str) -> None:
        self.module = module
        self.path = path
        self.previous = module.__dict__.get("forward")
        self.fast = type(module) is nn.Linear and self.previous is None
        self.lora: ConcatPlan | None = None
        self.ia3_in: torch.Tensor | None = None
        self.ia3_out: torch.Tensor | None = None
        self.merged: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.installed = False

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        m = self.module
        if self.merged is not None:
            return F.linear(x, self.merged[0], self.merged[1])
        h = x if self.ia3_in is None else _scale(x, self.ia3_in)
        if self.fast:
            y = F.linear(h, m.weight, m.bias)
        elif self.previous is not None:
            y = self.previous(h, *args, **kwargs)
        else:
            y = type(m).forward(m, h, *args, **kwargs)
        if self.ia3_out is not None:
            y = _scale(y, self.ia3_out)
        if self.lora is not None:
            y = self.lora.add_to(x, y, inplace=self.fast and not torch.is_grad_enabled())
        return y

    def set_payload(self, payload: dict[str, Any]) -> None:
        """Replace what the site computes (one assignment per field, no re-wrapping)."""
        self.lora = payload.get("lora")
        self.ia3_in = payload.get("ia3_in")
        self.ia3_out = payload.get("ia3_out")
        self.merged = payload.get("merged")


    @property
    def nbytes(self) -> int:
        n = self.lora.nbytes if self.lora is not None else 0
        for v in (self.ia3_in, self.ia3_out):
            n += v.numel() * v.element_size() if v is not None else 0
        if self.merged is not None:
            n += sum(t.numel() * t.element_size() for t in self.merged if t is not None)
        return n


def merged_copy(module: nn.Module, delta: torch.Tensor | None, lora_bias: torch.Tensor | None,
                ia3_in: torch.Tensor | None, ia3_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` = ``(diag(v_out) W diag(v_in) + delta, b * v_out + lora_bias)`` in float32, rounded once.

    A new tensor: the module's own weight is read, never written.
    """
    with torch.no_grad():
        w = module.weight.detach().to(torch.float32)
        if ia3_in is not None:
            w = w * ia3_in.to(w.device)[None, :]
        if ia3_out is not None:
            w = w * ia3_out.to(w.device)[:, None]
        if delta is not None:
            w = w + delta.to(w.device)
        b = module.bias.detach().to(torch.float32) if module.bias is not None else None
        if b is not None and ia3_out is not None:
            b = b * ia3_out.to(b.device)
        if lora_bias is not None:
            b = lora_bias.to(w.device) if b is None else b + lora_bias.to(b.device)
        dtype = module.weight.dtype
        return w.to(dtype).contiguous(), None if b is None else b.to(dtype)
