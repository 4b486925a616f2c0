"""Attach a composition to a live transformers model, and take it off again bit for bit.

``attach(model, composition)`` checks everything first (:mod:`adapterhub.runtime.plan`), then installs
per-module forwards and hooks (:mod:`linear`, :mod:`bottleneck`, :mod:`prefix`). Parameters, their
identities, their values and ``state_dict()`` keys never change: nothing is written into the model
but instance ``forward`` attributes and hook handles, and :meth:`Attached.detach` removes exactly
those. A model holds at most one attachment at a time.

Not thread-safe: attach, detach, swap and set_weights while no forward runs. Adapters run in eval
semantics (no dropout) and are not trainable through the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from adapterhub.adapter import Adapter
from adapterhub.compose.checks import Report
from adapterhub.errors import AttachedStateError, AttachError, CompositionError
from adapterhub.runtime.compose import Block, as_tree
from adapterhub.runtime.override import install_all
from adapterhub.runtime.plan import Plan, label, make_plan

#: where a model keeps its attachment (a plain attribute: no parameter, buffer or state_dict key; removed
#: by detach). On the model rather than in a global map, so a model dropped while attached is freed.
_ATTR = "_adapterhub_attached"


def attach(model: nn.Module, composition: Any, *, merge: bool = False, prefix_positions: str = "auto",
           resolve: Callable[[Any], Adapter] | None = None) -> Attached:
    """Apply ``composition`` to ``model`` without touching its weights; returns the :class:`Attached` handle.

    Args:
        model: a transformers model (``LlamaForCausalLM``, ``BertModel`` ...), used as is.
        composition: an :class:`~adapterhub.adapter.Adapter` or a tree of ``Sum``/``Stack``/``Average``
            blocks of them (with ``resolve``, leaves may be anything it turns into an Adapter).
        merge: fold LoRA and IA3 into *copies* of the targeted weights (faster forwards, one weight
            copy of memory per targeted module); the model's own weights are still never written.
        prefix_positions: ``"auto"`` numbers tokens after a prefix as the library that made it does
            (PEFT: from the prefix length; the ``adapters`` library: from 0); ``"peft"``/``"adapters"`` force one.
        resolve: turns a leaf that is not an Adapter into one (registry references, directories).

    Raises:
        CompositionError: a malformed tree (before anything is read).
        AttachError: an adapter does not fit the model; carries the reports. The model is unchanged.
        AttachedStateError: the model already has a composition attached.

    Example:
        >>> with attach(model, Stack(bn_task, Sum(lora_a, lora_b, weights=[0.7, 0.3]))) as attached:  # doctest: +SKIP
        ...     logits = model(input_ids).logits
    """
    if model.__dict__.get("_adapterhub_pool") is not None:
        raise AttachedStateError(f"{type(model).__name__} serves an adapter pool (adapterhub.runtime.pool).\n"
                                 "  fix: close the pool first, or serve the composition as a pool row.")
    current = attached_to(model)
    if current is not None:
        raise AttachedStateError(f"{type(model).__name__} already has a composition attached: {current.composition!r}."
                                 "\n  fix: detach it first, or attach one composition that holds both.")
    original = as_tree(composition)
    tree = original.map_leaves(resolve) if resolve is not None else original
    handle = Attached(model, original, tree, merge=merge, prefix_positions=prefix_positions, resolve=resolve)
    model.__dict__[_ATTR] = handle
    return handle


class Attached:
    """A composition attached to a model: :meth:`detach`, :meth:`swap`, :meth:`set_weights`; a context manager."""

    def __init__(self, model: nn.Module, original: Block, tree: Block, *, merge: bool, prefix_positions: str,
                 resolve: Callable[[Any], Adapter] | None) -> None:
        self.model = model
        self._user = original  # the tree as passed (blocks found by identity; never replaced)
        self._given = list(original.leaves())  # the leaves as passed, updated by swap
        self._resolve = resolve
        self._merge = merge
        self._prefix_positions = prefix_positions
        self._reports: dict[int, Report] = {}
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        plan = make_plan(model, tree, merge=merge, prefix_positions=prefix_positions, reports=self._reports,
                         tensor_cache=self._tensors)
        self._sites: dict[tuple[str, str], Any] = {}
        sites = {key: factory() for key, (factory, _) in plan.sites.items()}
        for key, site in sites.items():
            site.set_payload(plan.sites[key][1])
        install_all(sites.values())
        self._sites = sites
        self._tree = tree
        self._plan = plan
        self.attached = True

    # --- what is attached --------------------------------------------------------------------

    @property
    def composition(self) -> Block:
        """The attached tree (leaves are Adapter values)."""
        return self._tree

    @property
    def adapters(self) -> list[Adapter]:
        """Every leaf, depth first."""
        return list(self._tree.leaves())

    @property
    def reports(self) -> list[Report]:
        """The compatibility report of each adapter against the model (warnings and notes included)."""
        return list(self._plan.reports)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for kind, _ in self._sites:
            kinds[kind] = kinds.get(kind, 0) + 1
        nbytes = sum(getattr(s, "nbytes", 0) for s in self._sites.values())
        parts = [f"{n} {k} site(s)" for k, n in sorted(kinds.items())]
        if self._plan.prefix_tokens:
            parts.append(f"a prefix of {self._plan.prefix_tokens} tokens")
        text = (f"{'attached' if self.attached else 'detached'}: {self._tree!r} on {type(self.model).__name__}; "
                f"{', '.join(parts)}; runtime tensors {nbytes / 2**20:.2f} MiB")
        warned = sum(len(r.warnings) for r in self._plan.reports)
        if warned:
            text += f"; {warned} check warning(s), see .reports"
        if self._merge:
            text += (f"; merge=True: LoRA/IA3 folded into copies of {self._plan.merged_weights} weight(s) "
                     f"({self._plan.merged_bytes / 2**20:.2f} MiB), the model's own weights are untouched")
        return text

    def __repr__(self) -> str:
        return f"<Attached {self.summary()}>"

    # --- changing it ---------------------------------------------------------------------------

    def _require_attached(self) -> None:
        if not self.attached:
            raise AttachedStateError("this composition was detached.\n  fix: attach() again.")

    def _apply(self, tree: Block) -> None:
        """Plan ``tree`` and hand every installed site its new payload; no site is added or removed."""
        plan: Plan = make_plan(self.model, tree, merge=self._merge, prefix_positions=self._prefix_positions,
                               reports=self._reports, tensor_cache=self._tensors)
        missing = sorted(p for k, p in plan.sites if (k, p) not in self._sites)
        if missing:
            raise AttachError(
                f"the new composition needs modules the attached one does not touch: {', '.join(missing[:6])}"
                f"{' ...' if len(missing) > 6 else ''}; nothing was changed.\n"
                "  fix: detach and attach the new composition.")
        for key, site in self._sites.items():
            site.set_payload(plan.sites[key][1] if key in plan.sites else {})
        self._tree, self._plan = tree, plan
        live = {id(a) for a in tree.leaves()}
        for cache in (self._reports, self._tensors):
            for k in [k for k in cache if k not in live]:
                del cache[k]

    def set_weights(self, weights: Sequence[float], block: Block | Sequence[int] | None = None) -> None:
        """Give a ``Sum`` or ``Average`` new weights (the root block unless ``block`` says which).

        ``block`` is a block of the composition passed to :func:`attach` (by identity) or the path of
        child indices to it. Nothing changes if the new weights are refused.
        """
        self._require_attached()
        path = self._path_of(block)
        self._apply(self._tree.with_weights(path, weights))

    def swap(self, old: Any, new: Any) -> None:
        """Replace the adapter ``old`` (everywhere it occurs) by ``new`` of the same kind, without re-wrapping.

        ``old`` is a leaf as passed to :func:`attach` (an Adapter, a reference, a directory) or its
        index among the leaves; ``new`` an Adapter (or what the resolver of :func:`adapterhub.attach`
        reads). ``new`` is checked against the model first; nothing changes if it is refused.
        """
        self._require_attached()
        indices = self._leaf_indices(old)
        resolved = new if isinstance(new, Adapter) or self._resolve is None else self._resolve(new)
        leaves = self.adapters
        if isinstance(resolved, Adapter) and any(leaves[i].kind != resolved.kind for i in indices):
            raise CompositionError(f"cannot swap a {leaves[indices[0]].kind} adapter for a {resolved.kind} one.\n"
                                   "  fix: swap adapters of one kind; detach and attach for another composition.")
        counter = iter(range(1 << 30))
        tree = self._tree.map_leaves(lambda leaf: resolved if next(counter) in indices else leaf)
        self._apply(tree)
        for i in indices:
            self._given[i] = new

    def _leaf_indices(self, old: Any) -> list[int]:
        if isinstance(old, int) and not isinstance(old, bool):
            if not 0 <= old < len(self.adapters):
                raise CompositionError(f"there is no leaf #{old}; the composition has {len(self.adapters)}.\n"
                                       f"  fix: pass an index from 0 to {len(self.adapters) - 1}.")
            return [old]
        found = [i for i, (o, a) in enumerate(zip(self._given, self.adapters, strict=True))
                 if o is old or a is old or (isinstance(old, str) and (o == old or label(a, i) == old))]
        if not found:
            raise CompositionError(f"{old!r} is not part of the attached composition {self._tree!r}.\n"
                                   "  fix: pass the leaf as given to attach(), the Adapter, or its index.")
        return found

    def _path_of(self, block: Block | Sequence[int] | None) -> tuple[int, ...]:
        if block is None:
            return ()
        if isinstance(block, Block):
            path = self._user.find(block)
            if path is None:
                path = self._tree.find(block)
            if path is None:
                raise CompositionError(f"{block!r} is not a block of the attached composition.\n  fix: pass a "
                                       "block of the composition given to attach(), or its index path.")
            return path
        return tuple(int(i) for i in block)

    # --- taking it off -------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove every forward override and hook: the model is exactly as before :func:`attach`.

        Idempotent. Raises :class:`AttachedStateError` (and detaches nothing) if another wrapper was
        installed over one of ours since.
        """
        if not self.attached:
            return
        blocked = [s.path for s in self._sites.values()
                   if getattr(s, "module", None) is not None and s.kind in ("linear", "bottleneck")
                   and s.installed and s.module.__dict__.get("forward") is not s]
        if blocked:
            raise AttachedStateError(
                f"the forward of {', '.join(blocked[:4])} was replaced by someone else after adapterhub attached; "
                "nothing was detached.\n  fix: remove that wrapper first, then detach.")
        for site in reversed(list(self._sites.values())):
            site.uninstall()
        self._sites = {}
        self._tensors.clear()
        self._reports.clear()
        self.attached = False
        if self.model.__dict__.get(_ATTR) is self:
            del self.model.__dict__[_ATTR]

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()


def attached_to(model: nn.Module) -> Attached | None:
    """The composition attached to ``model``, or None."""
    handle = model.__dict__.get(_ATTR)
    return handle if handle is not None and handle.attached else None
