"""Composition blocks: ``Sum``, ``Stack`` and ``Average`` trees of adapters, and what each kind reads of them.

A composition is a leaf (an :class:`~adapterhub.adapter.Adapter`; above the runtime also a registry
reference or a directory) or a block of compositions. Each adapter kind reads the tree its own way:

=============  ==========================  ===========================  ==================================
block          LoRA                        IA3                          bottleneck / prefix
=============  ==========================  ===========================  ==================================
``Sum``        Σ w_i Δ_i                   Π v_i ** w_i                 refused
``Stack``      Σ Δ_i (not chained)         Π v_i                        applied in order / concatenated
``Average``    Σ (ŵ_i / n) Δ_i             refused                      the ``adapters`` library's Average
=============  ==========================  ===========================  ==================================

``ŵ`` are the weights normalised to sum 1 (default ``1/n`` each) and ``n`` the number of children:
the ``adapters`` library's ``Average`` computes ``mean_i(ŵ_i * out_i)``, so ``Average(a, b,
weights=[1, 0])`` is *half* of ``a``'s output, not ``a`` (see the README's worked example).

Example:
    >>> tree = Stack(prefix, Stack(bn_task, bn_lang), Sum(lora_a, lora_b, weights=[0.7, 0.3]))  # doctest: +SKIP

Importing this module does not import torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from adapterhub.errors import CompositionError

#: a path into a tree: child indices from the root
Path = tuple[int, ...]


class Block:
    """A node of a composition tree; use :class:`Sum`, :class:`Stack` or :class:`Average`."""

    __slots__ = ("children", "weights")
    weighted = False

    def __init__(self, *children: Any, weights: Sequence[float] | None = None) -> None:
        if len(children) == 1 and isinstance(children[0], list | tuple):
            children = tuple(children[0])
        name = type(self).__name__
        if not children:
            raise CompositionError(f"{name}() has no children.\n  fix: pass at least one adapter, e.g. {name}(a, b).")
        if weights is not None and not self.weighted:
            raise CompositionError(f"{name} takes no weights.\n  fix: use Sum(..., weights=...) for a weighted sum.")
        self.children: tuple[Any, ...] = tuple(children)
        self.weights: tuple[float, ...] | None = None if weights is None else _check_weights(name, weights,
                                                                                              len(children))

    # --- structure ---------------------------------------------------------------------------

    def child_weights(self) -> tuple[float, ...]:
        """The factor each child's contribution gets (all 1 for a Stack)."""
        return (1.0,) * len(self.children) if self.weights is None else self.weights

    def leaves(self) -> Iterator[Any]:
        """Every leaf, depth first, left to right (a leaf used twice is listed twice)."""
        for c in self.children:
            if isinstance(c, Block):
                yield from c.leaves()
            else:
                yield c

    def first(self) -> Any:
        """The first leaf (the ``adapters`` library's ``first()``)."""
        c = self.children[0]
        return c.first() if isinstance(c, Block) else c

    def map_leaves(self, fn: Callable[[Any], Any]) -> Block:
        """The same tree with every leaf replaced by ``fn(leaf)``."""
        new = object.__new__(type(self))
        new.children = tuple(c.map_leaves(fn) if isinstance(c, Block) else fn(c) for c in self.children)
        new.weights = self.weights
        if isinstance(self, Average):
            new.normalize = self.normalize
        return new

    def with_weights(self, at: Path, weights: Sequence[float]) -> Block:
        """A copy of the tree whose block at ``at`` has new weights (checked as at construction)."""
        node = self.at(at)
        if not node.weighted:
            raise CompositionError(f"the block at {list(at)} is a {type(node).__name__}, which has no weights.\n"
                                   "  fix: address a Sum or an Average.")
        new = self.map_leaves(lambda leaf: leaf)
        target = new.at(at)
        target.weights = _check_weights(type(node).__name__, weights, len(node.children))
        if isinstance(target, Average):
            target.normalized()  # a zero sum is refused here, before anything changes
        return new

    def at(self, path: Path) -> Block:
        """The block at ``path`` (child indices from this block)."""
        node: Any = self
        for i in path:
            if not isinstance(node, Block) or not 0 <= i < len(node.children):
                raise CompositionError(f"no block at {list(path)} in {self!r}.\n  fix: give an index path of "
                                       "one of its blocks, e.g. [] for the whole.")
            node = node.children[i]
        if not isinstance(node, Block):
            raise CompositionError(f"{list(path)} names a leaf of {self!r}, not a block.\n  fix: give the "
                                   "index path of the block holding it.")
        return node

    def find(self, block: Block) -> Path | None:
        """The path of ``block`` (by identity) in this tree, or None."""
        if block is self:
            return ()
        for i, c in enumerate(self.children):
            if isinstance(c, Block) and (sub := c.find(block)) is not None:
                return (i, *sub)
        return None

    def __repr__(self) -> str:
        inner = ", ".join(_label(c) for c in self.children)
        if self.weights is not None:
            inner += f", weights={list(self.weights)}"
        return f"{type(self).__name__}({inner})"


class Sum(Block):
    """LoRA / IA3: the weighted sum of deltas, Σ w_i s_i B_i A_i x (IA3: the product Π v_i ** w_i).

    Weights default to 1 each; negative weights subtract a task. Bottleneck adapters and prefixes
    cannot be summed (use :class:`Average` or :class:`Stack`).
    """

    __slots__ = ()
    weighted = True


class Stack(Block):
    """Bottleneck adapters applied one after the other at each place, as the ``adapters`` library stacks
    them; prefixes concatenated; LoRA and IA3 deltas added as in :class:`Sum` (not chained)."""

    __slots__ = ()


class Average(Block):
    """The ``adapters`` library's ``Average`` of bottleneck adapter outputs, weights normalised as it does.

    Each child's output (its residual included) is multiplied by ``ŵ_i = w_i / Σw`` (default ``1/n``)
    and the results are averaged over the ``n`` children: ``mean_i(ŵ_i * out_i)``. On LoRA children it
    computes what the library's LoRA ``Average`` does: Σ (ŵ_i / n) Δ_i. ``normalize=False`` keeps the
    weights as given (the library's ``normalize_weights=False``).
    """

    __slots__ = ("normalize",)
    weighted = True

    def __init__(self, *children: Any, weights: Sequence[float] | None = None, normalize: bool = True) -> None:
        super().__init__(*children, weights=weights)
        self.normalize = bool(normalize)
        self.normalized()

    def normalized(self) -> tuple[float, ...]:
        """ŵ: the weights the library multiplies each child's output by before taking the mean."""
        n = len(self.children)
        if self.weights is None:
            return (1.0 / n,) * n
        if not self.normalize:
            return self.weights
        total = sum(self.weights)
        if total == 0:
            raise CompositionError(f"Average weights {list(self.weights)} sum to 0 and cannot be normalised.\n"
                                   "  fix: give weights with a non-zero sum, or normalize=False.")
        return tuple(w / total for w in self.weights)

    def child_weights(self) -> tuple[float, ...]:
        """The factor each child's output ends up with: ŵ_i / n."""
        n = len(self.children)
        return tuple(w / n for w in self.normalized())


def _check_weights(name: str, weights: Sequence[float], n: int) -> tuple[float, ...]:
    try:
        out = tuple(float(w) for w in weights)
    except (TypeError, ValueError) as e:
        raise CompositionError(f"{name} weights must be numbers, got {weights!r}.\n  fix: give numbers, e.g. "
                               "[0.7, 0.3].") from e
    if len(out) != n:
        raise CompositionError(f"{name} has {n} children but {len(out)} weights.\n  fix: give one weight per child.")
    bad = [w for w in out if not math.isfinite(w)]
    if bad:
        raise CompositionError(f"{name} weights must be finite, got {list(out)}.\n  fix: replace NaN/Inf weights.")
    return out


def _label(leaf: Any) -> str:
    if isinstance(leaf, Block):
        return repr(leaf)
    if isinstance(leaf, str):
        return leaf
    src = getattr(leaf, "source", None) or getattr(leaf, "name", None)
    return str(src if src else leaf if isinstance(leaf, os.PathLike) else type(leaf).__name__)


def as_tree(composition: Any) -> Block:
    """The composition as a block: a single leaf becomes ``Stack(leaf)`` (as the ``adapters`` library
    activates a single adapter), a list becomes a ``Stack``."""
    if isinstance(composition, Block):
        return composition
    if isinstance(composition, list | tuple):
        return Stack(*composition)
    return Stack(composition)


# --- what each kind reads of a tree ------------------------------------------------------------------
# Leaves are addressed by their position in depth-first order (``leaf index``), so the same adapter used
# twice is two terms.


def leaf_kinds(tree: Block, kind_of: Callable[[Any], str]) -> list[str]:
    return [kind_of(leaf) for leaf in tree.leaves()]


def validate(tree: Block, kind_of: Callable[[Any], str]) -> None:
    """Refuse kinds in blocks that cannot hold them (before anything is loaded).

    Raises:
        CompositionError: a bottleneck adapter or prefix under a Sum, IA3 or a prefix under an Average,
            or an Average mixing kinds.
    """

    def walk(node: Block, inside: tuple[str, ...]) -> None:
        for c in node.children:
            if isinstance(c, Block):
                walk(c, (*inside, type(node).__name__))
                continue
            kind = kind_of(c)
            where = (*inside, type(node).__name__)
            if kind in ("bottleneck", "prefix") and "Sum" in where:
                hint = ("use Average (the adapters library's output average) or Stack; to average parameters, "
                        "blend them with `adapterhub blend`" if kind == "bottleneck" else "put prefixes in a Stack")
                raise CompositionError(f"{_label(c)} is a {kind} adapter inside a Sum, which only adds LoRA deltas and "
                                       f"multiplies IA3 vectors.\n  fix: {hint}.")
            if kind in ("ia3", "prefix") and "Average" in where:
                raise CompositionError(f"{_label(c)} is a {kind} adapter inside an Average, which the adapters "
                                       "library defines for bottleneck adapters and LoRA only.\n"
                                       "  fix: use Sum (IA3) or Stack (prefixes).")
        if isinstance(node, Average):
            kinds = {kind_of(leaf) for leaf in node.leaves()}
            if len(kinds) > 1:
                raise CompositionError(f"{node!r} mixes {', '.join(sorted(kinds))} adapters; an Average combines "
                                       "adapters of one kind.\n  fix: average each kind on its own and Stack them.")

    walk(tree, ())


def linear_terms(tree: Block, kind_of: Callable[[Any], str], kind: str) -> list[tuple[int, float]]:
    """(leaf index, factor) of every ``kind`` leaf: LoRA coefficients, or IA3 exponents."""
    out: list[tuple[int, float]] = []
    counter = iter(range(1 << 30))

    def walk(node: Block, factor: float) -> None:
        for c, w in zip(node.children, node.child_weights(), strict=True):
            if isinstance(c, Block):
                walk(c, factor * w)
            else:
                i = next(counter)
                if kind_of(c) == kind:
                    out.append((i, factor * w))

    walk(tree, 1.0)
    return out


def ordered_leaves(tree: Block, kind_of: Callable[[Any], str], kind: str) -> list[int]:
    """Leaf indices of every ``kind`` leaf in depth-first order (prefixes: concatenation order)."""
    return [i for i, leaf in enumerate(tree.leaves()) if kind_of(leaf) == kind]


def prune(tree: Block, keep: Callable[[int], bool]) -> Block | int | None:
    """The tree restricted to the leaves ``keep(leaf index)`` accepts, leaves replaced by their index.

    Blocks left empty disappear; a block keeps its type and the weights of its remaining children. Used
    for bottleneck trees, so Average never loses children here (validate() keeps kinds apart in it).
    """
    counter = iter(range(1 << 30))

    def walk(node: Block) -> Block | None:
        kept: list[Any] = []
        weights: list[float] = []
        for c, w in zip(node.children, node.weights or (1.0,) * len(node.children), strict=True):
            if isinstance(c, Block):
                sub = walk(c)
                if sub is not None:
                    kept.append(sub)
                    weights.append(w)
            else:
                i = next(counter)
                if keep(i):
                    kept.append(i)
                    weights.append(w)
        if not kept:
            return None
        new = object.__new__(type(node))
        new.children = tuple(kept)
        new.weights = None if node.weights is None else tuple(weights)
        if isinstance(node, Average):
            new.normalize = node.normalize
        return new

    return walk(tree)
