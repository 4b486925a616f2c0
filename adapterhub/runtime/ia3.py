"""IA3 at run time: one scaling vector per module, the product of the composition's vectors.

IA3 scales activations: a module's output (``y * v``) or, for feed-forward modules, its input
(``W (x * v)``). Two IA3 adapters on one module compose by multiplying their vectors, which is what
PEFT computes with several IA3 adapters active, so ``Sum(a, b, weights=[w_a, w_b])`` is
``v_a ** w_a * v_b ** w_b``: weight 1 is the adapter as trained, weight 0 removes it exactly (``v ** 0
= 1``), and 0.5 goes half the way in log space. A fractional weight needs positive entries (a negative
scale has no real fractional power); integer weights accept any sign.
"""

from __future__ import annotations

import torch

from adapterhub.errors import CompositionError


def ia3_vector(terms: list[tuple[torch.Tensor, float]], *, where: str) -> torch.Tensor | None:
    """``Π v_i ** e_i`` in float32 (flattened), in the given order; None when every exponent is 0.

    Raises:
        CompositionError: a fractional exponent of a vector with entries <= 0.
    """
    out: torch.Tensor | None = None
    for vec, e in terms:
        if e == 0.0:
            continue
        v = vec.to(torch.float32).flatten()
        if e != 1.0:
            if e != int(e) and bool((v <= 0).any()):
                raise CompositionError(
                    f"the IA3 vector of {where} has entries <= 0, which have no real power {e}.\n"
                    "  fix: give this adapter an integer weight (or 1), or leave it out of the Sum.")
            v = v ** e
        out = v if out is None else out * v
    return out
