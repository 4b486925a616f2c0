"""Bottleneck adapters at run time, computed exactly as the ``adapters`` library computes them.

One :class:`BottleneckModule` is one adapter at one location (the library's ``methods/modeling.py:
Adapter`` in eval mode, or ``ParallelAdapter`` for ``par_bn``): ``pre_forward`` (``original_ln_before``,
``residual_before_ln``; a parallel adapter reads the sub-block's input ``x``), ``forward``
(``adapter_up(act(adapter_down(h))) * scaling``, ``ln_before``/``ln_after``, the residual before or after
``adapter_norm_after``; none for a parallel adapter) and ``post_forward`` (a parallel adapter's output
is added to the sub-block's; ``original_ln_after``). Dropout and stochastic depth are identities (eval).

:func:`evaluate` runs a pruned composition tree at one location as the library's
``BottleneckLayer.compose`` does: ``Stack`` calls ``pre_forward`` of each adapter on the running state;
``Average`` calls the first adapter's ``pre_forward``, runs every child on that state and takes
``mean(stack(out_i) * ŵ_i)``; the last adapter applied does the ``post_forward``. A location where no
adapter of the tree has tensors is left alone, as in the library.

Sites (where the arithmetic meets the model, see :mod:`adapterhub.runtime.arch`):

- :class:`PostLNSite` replaces the forward of a BERT ``*SelfOutput``/``*Output`` module:
  ``LN(dropout(dense(h)) + x)`` becomes ``evaluate(dropout(dense(h)), x, LN)``;
- :class:`PreLNSite` hooks a Llama decoder layer: a forward pre-hook on ``residual_at`` keeps ``x``,
  a forward hook on ``sublayer`` returns the adapters' output so that the layer's own ``x + ...``
  gives what the library's layer returns (bit for bit when ``original_ln_after`` is set, as in
  ``seq_bn``/``double_seq_bn``/``par_bn``; else ``out - x``, exact up to rounding).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime.arch import PostLN, PreLN
from adapterhub.runtime.compose import Average, Block, Stack
from adapterhub.runtime.override import ForwardOverride

#: config keys whose truthy value the runtime cannot compute
UNSUPPORTED = {"use_gating": "gating", "phm_layer": "PHM layers", "inv_adapter": "invertible adapters"}


def unsupported_features(config: dict[str, Any]) -> list[str]:
    """What in a bottleneck config the runtime cannot run (empty: everything can)."""
    out = [what for key, what in UNSUPPORTED.items() if config.get(key)]
    if config.get("residual_before_ln") not in (True, False, "post_add"):
        out.append(f"residual_before_ln={config.get('residual_before_ln')!r}")
    return out


@functools.cache
def _activation(name: str) -> Any:
    """The library's activation (``transformers.activations.get_activation``); stateless, so shared."""
    name = (name or "").lower()
    if name == "leakyrelu":
        return F.leaky_relu
    from transformers.activations import get_activation

    return get_activation(name)


@dataclass
class BottleneckModule:
    """One bottleneck adapter at one location; tensors already on the model's device and dtype."""

    down_w: torch.Tensor
    down_b: torch.Tensor | None
    up_w: torch.Tensor
    up_b: torch.Tensor | None
    act: Any
    scaling: float | torch.Tensor
    norm_before: tuple[torch.Tensor, torch.Tensor] | None
    norm_after: tuple[torch.Tensor, torch.Tensor] | None
    residual_before_ln: bool | str
    adapter_residual_before_ln: bool
    original_ln_before: bool
    original_ln_after: bool
    parallel: bool = False

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], config: dict[str, Any]) -> BottleneckModule:
        """Build from role -> tensor (``adapter_down.0.weight`` ...) and the library's config dict."""
        ln_before = bool(config.get("ln_before"))
        lin = "adapter_down.1" if ln_before else "adapter_down.0"
        norm_before = None
        if ln_before:
            src = "adapter_norm_before" if "adapter_norm_before.weight" in t else "adapter_down.0"
            norm_before = (t[f"{src}.weight"], t[f"{src}.bias"])
        norm_after = (t["adapter_norm_after.weight"], t["adapter_norm_after.bias"]) if config.get("ln_after") else None
        scaling = t["scaling"] if "scaling" in t else float(config.get("scaling", 1.0))
        return cls(down_w=t[f"{lin}.weight"], down_b=t.get(f"{lin}.bias"), up_w=t["adapter_up.weight"],
                   up_b=t.get("adapter_up.bias"), act=_activation(str(config.get("non_linearity", "relu"))),
                   scaling=scaling, norm_before=norm_before, norm_after=norm_after,
                   residual_before_ln=config.get("residual_before_ln", True),
                   adapter_residual_before_ln=bool(config.get("adapter_residual_before_ln", False)),
                   original_ln_before=bool(config.get("original_ln_before", False)),
                   original_ln_after=bool(config.get("original_ln_after", True)),
                   parallel=bool(config.get("is_parallel", False)))

    def pre_forward(self, h: torch.Tensor, x: torch.Tensor | None, ln: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.parallel:
            return x, x
        residual = h if self.residual_before_ln is True else None
        if self.original_ln_before:
            if ln is not None:
                h = h + x
                if self.residual_before_ln == "post_add":
                    residual = h
                h = ln(h)
            elif x is not None:
                h = h + x
        if not self.residual_before_ln:
            residual = h
        return h, residual

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.norm_before is not None:
            h = F.layer_norm(h, (h.shape[-1],), self.norm_before[0], self.norm_before[1])
        down = self.act(F.linear(h, self.down_w, self.down_b))
        out = F.linear(down, self.up_w, self.up_b) * self.scaling
        if self.parallel:
            if self.norm_after is not None:
                out = F.layer_norm(out, (out.shape[-1],), self.norm_after[0], self.norm_after[1])
            return out
        if self.adapter_residual_before_ln:
            out = out + residual
        if self.norm_after is not None:
            out = F.layer_norm(out, (out.shape[-1],), self.norm_after[0], self.norm_after[1])
        if not self.adapter_residual_before_ln:
            out = out + residual
        return out

    def post_forward(self, h: torch.Tensor, h_in: torch.Tensor, x: torch.Tensor | None, ln: Any) -> torch.Tensor:
        """``h_in``: the sub-block's output before any adapter (a parallel adapter's output is added to it)."""
        if self.parallel:
            h = h + h_in
        if self.original_ln_after:
            if ln is not None:
                return ln(h + x)
            return h + x
        return h


class _State(NamedTuple):
    h: torch.Tensor
    x: torch.Tensor | None
    res: torch.Tensor | None
    last: int | None


def _pre_block(setup: Block | int, st: _State, mods: dict[int, BottleneckModule], ln: Any) -> _State:
    leaf = setup.first() if isinstance(setup, Block) else setup
    h, res = mods[leaf].pre_forward(st.h, st.x, ln)
    return st._replace(h=h, res=res)


def _single(leaf: int, st: _State, mods: dict[int, BottleneckModule]) -> _State:
    return st._replace(h=mods[leaf].forward(st.h, st.res), last=leaf)


def _compose(node: Block, st: _State, mods: dict[int, BottleneckModule], ln: Any) -> _State:
    if isinstance(node, Average):
        st = _pre_block(node, st, mods, ln)
        outs = [(_compose(c, st, mods, ln) if isinstance(c, Block) else _single(c, st, mods))
                for c in node.children if isinstance(c, Block) or c in mods]
        w = torch.tensor(node.normalized(), device=st.h.device)[:, None, None, None]
        mean = torch.mean(torch.stack([o.h for o in outs], 0) * w, dim=0).to(st.h.dtype)
        return _State(mean, outs[0].x, outs[0].res, outs[-1].last)
    for c in node.children:  # Stack (and the root)
        if isinstance(c, Block):
            st = _compose(c, st, mods, ln)
        elif c in mods:
            st = _pre_block(c, st, mods, ln)
            st = _single(c, st, mods)
    return st


def evaluate(tree: Block, mods: dict[int, BottleneckModule], h: torch.Tensor, x: torch.Tensor | None,
             ln: Any, *, post: bool = True) -> tuple[torch.Tensor, BottleneckModule]:
    """The composition's output at one location (``post=False``: before the last adapter's ``post_forward``
    adds ``x``, for a layer that adds it itself)."""
    st = _compose(tree, _State(h, x, x, None), mods, ln)
    last = mods[st.last]
    if post:
        return last.post_forward(st.h, h, st.x, ln), last
    return (st.h + h if last.parallel else st.h), last


def covered(tree: Block, present: set[int]) -> str | None:
    """Why the tree cannot run where only ``present`` leaves have tensors (None: it can).

    The library's Average needs every child (and its first leaf) at each location it runs.
    """
    def walk(node: Block) -> str | None:
        if isinstance(node, Average):
            for c in node.children:
                leaves = set(c.leaves()) if isinstance(c, Block) else {c}
                if not leaves & present:
                    return "an Average child has no adapter here"
            if node.first() not in present:
                return "the first adapter of an Average has no module here"
        for c in node.children:
            if isinstance(c, Block) and (why := walk(c)):
                return why
        return None

    return walk(tree)


class _BottleneckSite:
    kind = "bottleneck"

    def __init__(self, path: str) -> None:
        self.path = path
        self.tree: Block | None = None
        self.mods: dict[int, BottleneckModule] = {}
        self.installed = False

    def set_payload(self, payload: dict[str, Any]) -> None:
        self.tree, self.mods = payload.get("tree"), payload.get("mods", {})

    @property
    def active(self) -> bool:
        return self.tree is not None and bool(self.mods)

    @property
    def nbytes(self) -> int:
        n = 0
        for m in self.mods.values():
            for t in (m.down_w, m.down_b, m.up_w, m.up_b, *(m.norm_before or ()), *(m.norm_after or ())):
                n += t.numel() * t.element_size() if t is not None else 0
        return n


class PostLNSite(ForwardOverride, _BottleneckSite):
    """Replaces ``forward(h, x) = LN(dropout(dense(h)) + x)`` of one module."""

    undo_fix = "undo that change first, then detach"

    def __init__(self, module: nn.Module, path: str, place: PostLN) -> None:
        super().__init__(path)
        self.module = module
        self.place = place
        self.previous = module.__dict__.get("forward")

    def __call__(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        m, p = self.module, self.place
        if not self.active:
            return (self.previous or type(m).forward.__get__(m))(hidden_states, input_tensor, *args, **kw)
        h = getattr(m, p.dropout)(getattr(m, p.dense)(hidden_states))
        return evaluate(self.tree, self.mods, h, input_tensor, getattr(m, p.norm))[0]


class PreLNSite(_BottleneckSite):
    """Hooks of one pre-norm sub-block: keep the residual ``x``, rewrite the sub-block's output."""

    def __init__(self, layer: nn.Module, path: str, place: PreLN) -> None:
        super().__init__(path)
        self.sublayer = layer.get_submodule(place.sublayer)
        self.residual_module = layer.get_submodule(place.residual_at)
        self.handles: list[Any] = []
        self._x: torch.Tensor | None = None

    def _keep_residual(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._x = args[0] if args else next(iter(kwargs.values()))

    def _rewrite(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self.active:
            return None
        x, self._x = self._x, None
        h = output[0] if isinstance(output, tuple) else output
        out, last = evaluate(self.tree, self.mods, h, x, None, post=False)
        if not last.original_ln_after:
            out = out - x  # the layer adds x back
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def install(self) -> None:
        self.handles = [self.residual_module.register_forward_pre_hook(self._keep_residual, with_kwargs=True),
                        self.sublayer.register_forward_hook(self._rewrite)]
        self.installed = True

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._x = None
        self.installed = False


__all__ = ["BottleneckModule", "PostLNSite", "PreLNSite", "Stack", "covered", "evaluate", "unsupported_features"]
