"""Fixed-shape slot buffers per module, and the forward that gives every batch row its own adapter.

A :class:`SlotSite` is installed as a Linear module's instance ``forward`` (like
:class:`adapterhub.runtime.linear.LinearSite`: parameters, their identities and ``state_dict()`` keys
stay as they are) and holds, for ``S`` slots of rank at most ``R``::

    a   [S + 1, R, in]    LoRA A factors, ranks below R zero-padded (exact)
    bt  [S + 1, R, out]   LoRA B factors, transposed, with scale and composition weights folded in
    ia3_in  [S + 1, in]   IA3 input scales (feed-forward modules), float32; allocated on first use
    ia3_out [S + 1, out]  IA3 output scales, float32; allocated on first use

Slot 0 is "no adapter": zero factors and unit scales. Every row ``i`` of a batch runs

    y_i = (W (x_i * ia3_in[s_i]) + b) * ia3_out[s_i] + (x_i A[s_i]^T) B[s_i]^T

with ``s_i`` its slot: one gather and two batched matmuls (``torch.bmm``) per module, whatever the
mix of adapters; no loop over rows or adapters. A row of slot 0 gets exactly the bare base's output:
the scales multiply by 1.0 (exact), and its LoRA delta is replaced by -0.0 before the add (``y +
(-0.0)`` is ``y`` bit for bit, also for ``-0.0``, ``inf`` and NaN, where ``y + 0.0`` or an ``inf * 0``
would not be).

Writing a slot copies into the buffers in place; their shapes, dtypes and devices never change, so a
``torch.compile``d model does not recompile when adapters are loaded or evicted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.errors import PoolError
from adapterhub.runtime.override import ForwardOverride


class SlotState:
    """What the current batch runs, shared by every site of one pool: a slot index per row.

    ``idx`` is None outside :meth:`adapterhub.runtime.pool.Pool.forward` / ``generate`` (the sites then
    pass the base through untouched). ``has_none`` says whether some row runs without an adapter.
    """

    __slots__ = ("idx", "none", "has_none", "_expanded")

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None
        self.none: torch.Tensor | None = None
        self.has_none = False
        self._expanded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, idx: torch.Tensor | None, has_none: bool = False) -> None:
        self.idx = idx
        self.none = None if idx is None else (idx == 0).view(-1, 1, 1)
        self.has_none = has_none
        self._expanded = {}

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot index and the no-adapter mask for a batch of ``n`` rows: ``generate`` with beams or
        several return sequences repeats each row ``k`` times in place (``repeat_interleave``), so the
        index is repeated the same way."""
        idx, none = self.idx, self.none
        if idx is None or none is None:
            raise PoolError("no batch is being run.\n  fix: run the model through pool.forward() or pool.generate().")
        b = idx.shape[0]
        if n == b:
            return idx, none
        if n % b:
            raise PoolError(f"a module saw a batch of {n} rows, which is no multiple of the {b} rows the pool was "
                            "given.\n  fix: give one adapter per row of the inputs; the pool supports generate()'s "
                            "row expansion (beams, num_return_sequences) only.")
        if n not in self._expanded:
            k = n // b
            self._expanded[n] = (idx.repeat_interleave(k), none.repeat_interleave(k, dim=0))
        return self._expanded[n]


def _gathered_scale(t: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t * table[idx]`` per row (``t``: [b, ..., d]), computed in the table's float32, returned in ``t``'s dtype."""
    v = table.index_select(0, idx)
    v = v.view(v.shape[0], *([1] * (t.dim() - 2)), v.shape[1])
    return t * v if t.dtype == v.dtype else (t.to(v.dtype) * v).to(t.dtype)


class SlotSite(ForwardOverride):
    """The per-row adapter forward of one ``nn.Linear``; buffers are allocated once and written in place."""

    kind = "slots"
    changed_when = "while the pool was being built"
    changed_fix = "build the pool again"
    owner = "the pool installed its own"
    undo_fix = "undo that change first (remove the other wrapper), then close the pool"

    def __init__(self, module: nn.Module, path: str, state: SlotState, *, slots: int, max_rank: int) -> None:
        w = module.weight
        self.module = module
        self.path = path
        self.state = state
        self.previous = module.__dict__.get("forward")
        self.fast = type(module) is nn.Linear and self.previous is None
        # nn.Linear holds W as [out, in]; transformers' Conv1D (GPT-2) as [in, out]
        self.out_features, self.in_features = w.shape if isinstance(module, nn.Linear) else w.shape[::-1]
        self.a = torch.zeros(slots + 1, max_rank, self.in_features, dtype=w.dtype, device=w.device)
        self.bt = torch.zeros(slots + 1, max_rank, self.out_features, dtype=w.dtype, device=w.device)
        self.ia3_in: torch.Tensor | None = None
        self.ia3_out: torch.Tensor | None = None
        self.installed = False

    # --- running ---------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        st = self.state
        if st.idx is None:
            return self._base(x, *args, **kwargs)
        idx, none = st.rows(x.shape[0])
        h = x if self.ia3_in is None else _gathered_scale(x, self.ia3_in, idx)
        y = self._base(h, *args, **kwargs)
        if self.ia3_out is not None:
            y = _gathered_scale(y, self.ia3_out, idx)
        b = x.shape[0]
        x3 = x.reshape(b, -1, self.in_features)
        if x3.dtype != self.a.dtype:
            x3 = x3.to(self.a.dtype)
        xa = torch.bmm(x3, self.a.index_select(0, idx).transpose(1, 2))  # [b, t, R]
        bt = self.bt.index_select(0, idx)  # [b, R, out]
        y3 = y.view(b, -1, self.out_features) if y.is_contiguous() else y.reshape(b, -1, self.out_features)
        inplace = not torch.is_grad_enabled() and y.is_contiguous() and y.dtype == bt.dtype
        if not st.has_none:
            if inplace:
                y3.baddbmm_(xa, bt)
                return y
            return (y3 + torch.bmm(xa, bt).to(y.dtype)).view(y.shape)
        delta = torch.bmm(xa, bt).masked_fill_(none, -0.0)
        if inplace:
            y3.add_(delta)
            return y
        return (y3 + delta.to(y.dtype)).view(y.shape)

    def _base(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        m = self.module
        if self.fast:
            return F.linear(x, m.weight, m.bias)
        if self.previous is not None:
            return self.previous(x, *args, **kwargs)
        return type(m).forward(m, x, *args, **kwargs)

    # --- writing slots ---------------------------------------------------------------------------

    def write_lora(self, slot: int, a: torch.Tensor | None, bt: torch.Tensor | None) -> None:
        """Slot ``slot`` gets the factors ``a`` [r, in] and ``bt`` [r, out] (zero-padded to R); None clears it."""
        if a is None or bt is None:
            self.a[slot].zero_()
            self.bt[slot].zero_()
            return
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.a[slot, r:].zero_()
        self.bt[slot, :r].copy_(bt)
        self.bt[slot, r:].zero_()

    def write_ia3(self, slot: int, side: str, vector: torch.Tensor | None) -> bool:
        """Slot ``slot`` scales this side (``"ia3_in"``/``"ia3_out"``) by ``vector`` (None: by 1).

        Returns True when this side was allocated now (the module runs one more multiply from now on).
        """
        table: torch.Tensor | None = getattr(self, side)
        if table is None:
            if vector is None:
                return False
            n = self.in_features if side == "ia3_in" else self.out_features
            table = torch.ones(self.a.shape[0], n, dtype=torch.float32, device=self.a.device)
            setattr(self, side, table)
            created = True
        else:
            created = False
        if vector is None:
            table[slot].fill_(1.0)
        else:
            table[slot].copy_(vector.reshape(-1))
        return created

    def clear(self, slot: int) -> None:
        self.write_lora(slot, None, None)
        for side in ("ia3_in", "ia3_out"):
            if getattr(self, side) is not None:
                self.write_ia3(slot, side, None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.bt, self.ia3_in, self.ia3_out) if t is not None)

