"""Multi-tenant serving: one resident base model, many adapters loaded on demand, one adapter per batch row.

``Pool(model, slots=S, max_rank=R, resolve=...)`` installs a :class:`~adapterhub.runtime.slots.SlotSite`
on every targeted Linear module (the weights are never written) and keeps up to ``S`` adapters in
fixed-shape slot buffers. ``pool.forward(adapters=[...], **inputs)`` runs a batch whose row ``i`` gets
``adapters[i]``: a reference (what ``resolve`` turns into an Adapter: a registry reference, a
directory), an :class:`~adapterhub.adapter.Adapter`, a ``Sum``/``Stack``/``Average`` of LoRAs (or a
``Sum``/``Stack`` of IA3 adapters), or None for the bare base. Adapters not resident are read,
checked against the model (the checks ``attach`` runs) and copied into free slots, evicting the least
recently used unpinned ones; every row is checked before anything is loaded, evicted or run, and a
refusal names the row.

The registry-aware constructor lives above the runtime: ``adapterhub.Pool(model, registry=PATH, ...)``.

Several threads may share a pool: their calls run one after the other (a lock); a call from inside a running
batch (a hook of the model) is refused. Runs in eval semantics under ``torch.no_grad()``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from adapterhub.adapter import Adapter
from adapterhub.errors import AdapterHubError, AttachedStateError, AttachError, CompositionError, PoolError
from adapterhub.runtime.compose import Block, as_tree, linear_terms
from adapterhub.runtime.ia3 import ia3_vector
from adapterhub.runtime.linear import is_linear_like
from adapterhub.runtime.override import install_all
from adapterhub.runtime.plan import check_tree, label
from adapterhub.runtime.slots import SlotSite, SlotState
from adapterhub.runtime.view import LiveModel
from adapterhub.tensorfile import TensorInfo

#: where a model keeps its open pool (a plain attribute, removed by close)
_ATTR = "_adapterhub_pool"
_KINDS = ("lora", "ia3")
#: where an Adapter value keeps its pool identity once computed (in its instance __dict__, like cached_property)
_IDENT_ATTR = "_adapterhub_pool_identity"


@dataclass
class _Entry:
    """One resident adapter (or composition): its slot and what keeps it there."""

    ident: Hashable
    slot: int
    label: str
    tree: Block  # its leaves are Adapter values (kept alive while resident)
    rank: int
    nbytes: int
    pins: int = 0
    keys: set[Hashable] = field(default_factory=set)


@dataclass
class _Payload:
    """What one row's adapter writes into its slot, computed and checked before anything is written."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ia3: dict[str, dict[str, torch.Tensor]]
    rank: int
    nbytes: int


def _kind(adapter: Adapter) -> str:
    return adapter.kind


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, checked in chunks small enough to run on one thread (a parallel reduction waits
    for every worker thread, which on a busy machine costs milliseconds for a few thousand elements)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(16384))


class Pool:
    """Up to ``slots`` adapters of rank at most ``max_rank`` resident on one live model, one per batch row.

    Args:
        model: a transformers model (moved to its device and dtype first), used as is; its weights are
            never written.
        slots: how many adapters stay resident (slot buffers are allocated once, for all of them).
        max_rank: the largest LoRA rank a slot holds (a composition's ranks add up); lower ranks are
            zero-padded, which is exact.
        targets: the modules that get slots: ``"all-linear"`` (every Linear but the output layer, as
            PEFT's ``all-linear``) or module names (a name matches a module whose path equals it or ends
            with ``.name``). An adapter reaching beyond them is refused.
        resolve: turns a row that is not an Adapter (a reference, a directory) into one.

    Example:
        >>> pool = Pool(model, slots=64, max_rank=16, resolve=my_resolver)  # doctest: +SKIP
        >>> out = pool.forward(adapters=["team/a@2", None, "team/b"], input_ids=ids)  # doctest: +SKIP

    Memory: ``(slots + 1) * max_rank * (in + out)`` elements of the model's dtype per targeted module,
    allocated once; IA3 adds ``(slots + 1) * in`` (or ``out``) float32 elements for a module the first
    time an IA3 adapter scales it there.
    """

    def __init__(self, model: nn.Module, *, slots: int = 8, max_rank: int = 16,
                 targets: str | Sequence[str] = "all-linear",
                 resolve: Callable[[Any], Adapter] | None = None, **unknown: Any) -> None:
        if "registry" in unknown:
            raise PoolError("adapterhub.runtime.Pool takes Adapter values and a resolver, never a registry.\n"
                            "  fix: adapterhub.Pool(model, registry=..., slots=..., max_rank=...) resolves registry "
                            "references (it is this pool with a registry resolver).")
        if unknown:
            raise TypeError(f"Pool() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
            raise PoolError("a pool needs a transformers model (an nn.Module with a .config), got "
                            f"{type(model).__name__}.\n  fix: load the base with transformers' "
                            "AutoModel*.from_pretrained and pass that model.")
        for name, value in (("slots", slots), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PoolError(f"{name} must be a positive integer, not {value!r}.\n  fix: e.g. {name}=16.")
        if resolve is not None and not callable(resolve):
            raise PoolError(f"resolve must be a function turning a row into an Adapter, not {type(resolve).__name__}."
                            "\n  fix: pass resolve=adapterhub.open (directories), or use adapterhub.Pool(model, "
                            "registry=...) for registry references.")
        from adapterhub.runtime.attached import attached_to

        if attached_to(model) is not None or model.__dict__.get(_ATTR) is not None:
            what = "a pool" if model.__dict__.get(_ATTR) is not None else "a composition attached"
            raise AttachedStateError(f"{type(model).__name__} already has {what}.\n"
                                     "  fix: close the pool / detach the composition first.")
        self.model = model
        self.slots = slots
        self.max_rank = max_rank
        self._resolve = resolve
        self._state = SlotState()
        self._runner: Callable[..., Any] = model
        self._sites: dict[str, SlotSite] = {}
        paths = _targets(model, targets)
        if not paths:
            raise PoolError(f"no Linear module of {type(model).__name__} matches targets={targets!r}.\n"
                            "  fix: name modules the model has (e.g. q_proj, v_proj), or use 'all-linear'.")
        try:
            sites = {p: SlotSite(model.get_submodule(p), p, self._state, slots=slots, max_rank=max_rank)
                     for p in paths}
        except RuntimeError as e:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
                raise
            need = _slot_bytes(model, paths, slots, max_rank)
            raise PoolError(f"the slot buffers for slots={slots}, max_rank={max_rank} need {need / 2**30:.3g} GiB "
                            f"on {next(model.parameters()).device}, which could not be allocated ({e}).\n"
                            "  fix: build the pool with fewer slots or a smaller max_rank.") from e
        install_all(sites.values())
        self._sites = sites
        self._device = next(iter(sites.values())).a.device
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._alias: dict[Hashable, Hashable] = {}  # row key -> entry identity
        self._free = list(range(slots, 0, -1))  # slot 0 is "no adapter"
        self._written: dict[int, set[str]] = {}  # slot -> the sites holding something of it
        self._live = LiveModel(model, {n: m for n, m in model.named_modules() if n})
        self.counters = {"loads": 0, "hits": 0, "evictions": 0, "batches": 0, "ia3_sides": 0}
        self.open = True
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread running a pool call
        model.__dict__[_ATTR] = self

    # --- running batches -------------------------------------------------------------------------

    def forward(self, adapters: Sequence[Any], **inputs: Any) -> Any:
        """``model(**inputs)`` with row ``i`` running ``adapters[i]`` (None: the bare base); returns what the
        model returns.

        Raises:
            PoolError: a row's adapter is unknown, does not fit the model, has a rank above ``max_rank``,
                targets a module without slots, or the batch needs more slots than are free; raised
                before anything is loaded, evicted or run, naming the row.
        """
        with self._exclusive():
            slots = self._prepare(adapters, _batch_size(inputs, "forward"))
            with self._running(slots), torch.no_grad():
                return self._runner(**inputs)

    __call__ = forward

    def generate(self, adapters: Sequence[Any], **generate_kwargs: Any) -> Any:
        """``model.generate(**generate_kwargs)`` with row ``i`` of the prompts running ``adapters[i]``.

        Greedy decoding, sampling and beam search work; rows that ``generate`` expands (``num_beams``,
        ``num_return_sequences``) keep their row's adapter. Raises as :meth:`forward`.
        """
        if not callable(getattr(self.model, "generate", None)):
            raise PoolError(f"{type(self.model).__name__} has no generate().\n  fix: use pool.forward(), or serve a "
                            "causal LM (AutoModelForCausalLM) to generate.")
        with self._exclusive():
            slots = self._prepare(adapters, _batch_size(generate_kwargs, "generate"))
            with self._running(slots), torch.no_grad():
                return self.model.generate(**generate_kwargs)

    def compile(self, **options: Any) -> None:
        """Run :meth:`forward` through ``torch.compile(model, **options)``. Loading and evicting adapters
        never changes a tensor shape, so they cause no recompilation (see the README for what does)."""
        with self._exclusive():
            self._require_open()
            self._runner = torch.compile(self.model, **options)

    class _Running:
        def __init__(self, pool: Pool, slots: list[int]) -> None:
            self.pool, self.slots = pool, slots

        def __enter__(self) -> None:
            idx = torch.tensor(self.slots, dtype=torch.long, device=self.pool._device)
            self.pool._state.set(idx, has_none=0 in self.slots)

        def __exit__(self, *exc: object) -> None:
            self.pool._state.set(None)

    def _running(self, slots: list[int]) -> Pool._Running:
        self.counters["batches"] += 1
        return Pool._Running(self, slots)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One pool call at a time: other threads wait their turn; a call from inside the running one (a hook of
        the model, a resolver) is refused, as it would change slots under the batch."""
        me = threading.get_ident()
        if self._owner == me:
            raise PoolError("the pool is running a batch already (a call from inside the model, or from a "
                            "resolver).\n  fix: call the pool from outside its own batch.")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    # --- what is resident ------------------------------------------------------------------------

    def prepare(self, adapters: Sequence[Any], batch_size: int | None = None) -> list[int]:
        """Make every row's adapter resident (loading, checking and evicting as needed); the slot per row.

        Everything is resolved and checked before the first slot is written: a refused batch changes
        nothing. Raises :class:`PoolError` naming the row at fault.
        """
        with self._exclusive():
            return self._prepare(adapters, batch_size)

    def _prepare(self, adapters: Sequence[Any], batch_size: int | None = None) -> list[int]:
        self._require_open()
        if isinstance(adapters, str | Adapter | Block) or not isinstance(adapters, Sequence):
            raise PoolError("adapters must be a list with one entry per batch row (None for no adapter), not "
                            f"{type(adapters).__name__}.\n  fix: adapters=[...] as long as the batch.")
        rows = list(adapters)
        if batch_size is not None and len(rows) != batch_size:
            raise PoolError(f"the batch has {batch_size} row(s) but {len(rows)} adapter(s) were given.\n"
                            "  fix: give one entry per row (None for a row without adapter).")
        row_ident: list[Hashable | None] = []
        aliases: dict[Hashable, Hashable] = {}
        new: dict[Hashable, tuple[int, str, Block]] = {}
        for i, row in enumerate(rows):
            if row is None:
                row_ident.append(None)
                continue
            key = _row_key(row, i)
            ident = self._alias.get(key, aliases.get(key))
            if ident is None or (ident not in self._entries and ident not in new):
                tree, ident = self._resolve_row(row, i)
                aliases[key] = ident
                if ident not in self._entries and ident not in new:
                    new[ident] = (i, _label(row), tree)
            row_ident.append(ident)
        needed = {x for x in row_ident if x is not None}
        if len(needed) > self.slots:
            raise PoolError(f"the batch needs {len(needed)} different adapters but the pool has {self.slots} slots.\n"
                            "  fix: split the batch, or build the pool with more slots.")
        evictable = sum(1 for e in self._entries.values() if e.pins == 0 and e.ident not in needed)
        if len(new) > len(self._free) + evictable:
            pinned = sum(1 for e in self._entries.values() if e.pins)
            raise PoolError(f"the batch needs {len(new)} adapter(s) loaded but only {len(self._free) + evictable} "
                            f"slot(s) can be freed ({pinned} pinned).\n  fix: unpin adapters, or build the pool with "
                            "more slots.")
        payloads = {ident: self._payload(i, lab, tree) for ident, (i, lab, tree) in new.items()}
        for ident, (_, lab, tree) in new.items():
            slot = self._free.pop() if self._free else self._evict_lru(keep=needed)
            self._write(slot, payloads[ident])
            self._entries[ident] = _Entry(ident, slot, lab, tree, payloads[ident].rank, payloads[ident].nbytes)
            self.counters["loads"] += 1
        for key, ident in aliases.items():
            self._alias[key] = ident
            self._entries[ident].keys.add(key)
        self.counters["hits"] += sum(1 for x in needed if x not in new)
        out = []
        for ident in row_ident:
            if ident is None:
                out.append(0)
            else:
                self._entries.move_to_end(ident)
                out.append(self._entries[ident].slot)
        return out

    def load(self, adapter: Any) -> int:
        """Make ``adapter`` resident (as a batch row would); its slot."""
        with self._exclusive():
            return self._prepare([adapter])[0]

    def pin(self, adapter: Any) -> int:
        """Load ``adapter`` if needed and keep it resident until :meth:`unpin` (pins count); its slot."""
        with self._exclusive():
            slot = self._prepare([adapter])[0]
            self._entry_of(adapter).pins += 1
            return slot

    def unpin(self, adapter: Any) -> None:
        """Undo one :meth:`pin`."""
        with self._exclusive():
            entry = self._entry_of(adapter)
            if entry.pins == 0:
                raise PoolError(f"{entry.label} is not pinned.\n  fix: unpin() only what pin() pinned (pins count).")
            entry.pins -= 1

    def evict(self, adapter: Any) -> None:
        """Free ``adapter``'s slot now (a moved tag or a changed directory is read again on next use)."""
        with self._exclusive():
            entry = self._entry_of(adapter)
            if entry.pins:
                raise PoolError(f"{entry.label} is pinned ({entry.pins}x) and cannot be evicted.\n"
                                "  fix: unpin it first.")
            self._drop(entry)

    def resident(self) -> list[dict[str, Any]]:
        """What each used slot holds, least recently used first."""
        return [{"label": e.label, "slot": e.slot, "rank": e.rank, "pins": e.pins, "bytes": e.nbytes}
                for e in self._entries.values()]

    def __contains__(self, adapter: Any) -> bool:
        ident = self._alias.get(_row_key(adapter, 0)) if adapter is not None else None
        return ident is not None and ident in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of every slot buffer (allocated once: the pool's whole memory, however many adapters pass)."""
        return sum(s.nbytes for s in self._sites.values())

    def base_nbytes(self) -> int:
        """Bytes of the model's parameters and buffers (each storage counted once)."""
        seen: set[int] = set()
        total = 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    def stats(self) -> dict[str, Any]:
        """Slots used and pinned, loads, hits, evictions, batches, the pool's and the base's bytes."""
        return {"slots": self.slots, "max_rank": self.max_rank, "modules": len(self._sites),
                "used": len(self._entries), "pinned": sum(1 for e in self._entries.values() if e.pins),
                **self.counters, "pool_bytes": self.nbytes, "base_bytes": self.base_nbytes()}

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<Pool {s['used']}/{s['slots']} slots used, max_rank {self.max_rank}, {s['modules']} modules, "
                f"{s['pool_bytes'] / 2**20:.2f} MiB of slots{'' if self.open else ', closed'}>")

    # --- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every installed forward: the model is exactly as before. Idempotent."""
        with self._exclusive():
            self._close()

    def _close(self) -> None:
        if not self.open:
            return
        blocked = [s.path for s in self._sites.values() if s.installed and s.module.__dict__.get("forward") is not s]
        if blocked:
            raise AttachedStateError(f"the forward of {', '.join(blocked[:4])} was replaced by someone else after the "
                                     "pool installed its own; nothing was removed.\n  fix: remove that wrapper first.")
        for site in reversed(list(self._sites.values())):
            site.uninstall()
        self._sites = {}
        self._entries.clear()
        self._alias.clear()
        self._runner = self.model
        self.open = False
        if self.model.__dict__.get(_ATTR) is self:
            del self.model.__dict__[_ATTR]

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _require_open(self) -> None:
        if not self.open:
            raise AttachedStateError("this pool was closed.\n  fix: build a new Pool.")

    # --- internals -------------------------------------------------------------------------------

    def _resolve_row(self, row: Any, i: int) -> tuple[Block, Hashable]:
        """The row as a tree of Adapter values, and the identity of what it names (so that two
        references to one registry version share a slot)."""
        def leaf(x: Any) -> Adapter:
            if isinstance(x, Adapter):
                return x
            if self._resolve is None:
                raise PoolError(f"row {i}: {x!r} is no Adapter, and the pool has no resolver.\n"
                                "  fix: build it with adapterhub.Pool(model, registry=...) to serve registry "
                                "references and directories, or pass Adapter values.", row=i, ref=_label(row))
            out = self._resolve(x)
            if not isinstance(out, Adapter):
                raise PoolError(f"row {i}: the resolver turned {x!r} into a {type(out).__name__}, not an Adapter.\n"
                                "  fix: make the resolver return adapterhub Adapter values (adapterhub.load / "
                                "read_adapter).",
                                row=i, ref=_label(row))
            return out

        try:
            tree = as_tree(row).map_leaves(leaf)
        except PoolError:
            raise
        except AdapterHubError as e:
            raise _row_error(i, row, e) from e
        return tree, _identity(tree if isinstance(row, Block) else tree.children[0])

    def _payload(self, i: int, lab: str, tree: Block) -> _Payload:
        """Check row ``i``'s tree against the model (the checks ``attach`` runs) and fold it into slot contents
        (float32, rounded once when written); nothing is written."""

        def refuse(message: str, fix: str, reports: list[object] | None = None) -> PoolError:
            return PoolError(f"row {i} ({lab}): {message}.\n  fix: {fix}.", row=i, ref=lab, reports=reports)

        leaves = list(tree.leaves())
        for leaf in leaves:
            if leaf.kind not in _KINDS:
                raise refuse(f"{label(leaf, 0)} is a {leaf.kind} adapter; a pool serves LoRA and IA3 adapters per row",
                             "attach() it to a model of its own, or serve a LoRA/IA3 version of it")
        lora_terms = [(leaves[idx], coeff) for idx, coeff in linear_terms(tree, _kind, "lora") if coeff != 0.0]
        for a, _ in lora_terms:
            for m in a.modules():
                if "lora_A" in a.module_tensors(m) and (r := a.lora_rank(m)) > self.max_rank:
                    raise refuse(f"{label(a, 0)} has rank {r} at {m}, above the pool's max_rank {self.max_rank}",
                                 f"build the pool with max_rank={r} or more, or `adapterhub blend SRC --method svd "
                                 f"--rank {self.max_rank}` for a lower-rank copy")
        reports: dict[int, Any] = {}
        try:
            check_tree(self.model, tree, reports=reports, live=self._live)
        except (AttachError, CompositionError) as e:
            raise _row_error(i, lab, e, reports=getattr(e, "reports", None)) from e

        def site_of(a: Adapter, m: str) -> str:
            path = reports[id(a)].resolved[m].rpartition(".")[0]
            if path not in self._sites:
                raise refuse(f"{label(a, 0)} changes {path}, which has no slots in this pool",
                             "build the pool with targets that include it (targets='all-linear' covers every Linear "
                             "but the output layer)")
            return path

        lora: dict[str, list[tuple[Adapter, str, str, float]]] = {}
        for a, coeff in lora_terms:
            for m in a.modules():
                roles = a.module_tensors(m)
                if "lora_B.bias" in roles:
                    raise refuse("LoRA bias (lora_bias) is not served per row",
                                 "attach() it to a model of its own, or export a merged checkpoint")
                term = (a, roles["lora_A"], roles["lora_B"], coeff * a.spec.scale(m))
                lora.setdefault(site_of(a, m), []).append(term)
        ia3: dict[str, dict[str, list[tuple[torch.Tensor, float]]]] = {}
        for idx, exponent in linear_terms(tree, _kind, "ia3"):
            a = leaves[idx]
            for m in a.modules():
                side = "ia3_in" if a.spec.is_feedforward(m) else "ia3_out"
                ia3.setdefault(site_of(a, m), {}).setdefault(side, []).append(
                    (a.tensors[a.module_tensors(m)["ia3_l"]], exponent))
        ranks = {p: sum(a.tensors.shape(an)[0] for a, an, _, _ in terms) for p, terms in lora.items()}
        for path, r in ranks.items():
            if r > self.max_rank:
                raise refuse(f"the composition adds up to rank {r} at {path}, above the pool's max_rank "
                             f"{self.max_rank}", f"build the pool with max_rank={r} or more, or blend the adapters "
                             f"into one (`adapterhub blend ... --method svd --rank {self.max_rank}`)")
        # per module one float32 buffer [r, in + out] holding A and the scaled B^T: one finiteness check each
        out_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        bad: list[str] = []
        for path, terms in lora.items():
            site, r = self._sites[path], ranks[path]
            buf = torch.empty(r, site.in_features + site.out_features, dtype=torch.float32)
            a_all, bt_all = buf[:, :site.in_features], buf[:, site.in_features:]
            row = 0
            for a, a_name, b_name, factor in terms:
                ta, tb = a.tensors[a_name], a.tensors[b_name]
                k = ta.shape[0]
                a_all[row:row + k].copy_(ta)
                torch.mul(tb.t().to(torch.float32), factor, out=bt_all[row:row + k])
                row += k
            if not _all_finite(buf):
                bad.append(path)
            out_lora[path] = (a_all, bt_all)
        out_ia3: dict[str, dict[str, torch.Tensor]] = {}
        for path, sides in ia3.items():
            for side, vectors in sides.items():
                try:
                    v = ia3_vector(vectors, where=path)
                except CompositionError as e:
                    raise _row_error(i, lab, e) from e
                if v is not None:
                    out_ia3.setdefault(path, {})[side] = v
                    if not _all_finite(v):
                        bad.append(path)
        if bad:
            raise refuse(f"the adapter holds NaN or Inf values (or overflows once scaled) at {', '.join(bad[:4])}",
                         "re-export or retrain the adapter")
        sizes = {p: a.numel() + b.numel() for p, (a, b) in out_lora.items()}
        itemsize = next(iter(self._sites.values())).a.element_size()
        nbytes = sum(sizes.values()) * itemsize + sum(4 * v.numel() for s in out_ia3.values() for v in s.values())
        return _Payload(out_lora, out_ia3, max(ranks.values(), default=0), nbytes)

    def _write(self, slot: int, payload: _Payload) -> None:
        """Write ``payload`` into ``slot`` of every site it touches, and clear what the slot held elsewhere."""
        paths = set(payload.lora) | set(payload.ia3)
        for path in sorted(paths | self._written.get(slot, set())):
            site = self._sites[path]
            pair = payload.lora.get(path)
            site.write_lora(slot, *(pair if pair is not None else (None, None)))
            sides = payload.ia3.get(path, {})
            for side in ("ia3_in", "ia3_out"):
                if site.write_ia3(slot, side, sides.get(side)):
                    self.counters["ia3_sides"] += 1
        self._written[slot] = paths

    def _evict_lru(self, keep: set[Hashable]) -> int:
        """Free the least recently used unpinned slot outside ``keep``, without clearing it (the caller writes it)."""
        for entry in self._entries.values():
            if entry.pins == 0 and entry.ident not in keep:
                slot = entry.slot
                self._drop(entry, free=False)
                return slot
        # not reached: prepare() counted the evictable slots first
        raise PoolError("no slot can be freed.\n  fix: unpin adapters, or build the pool with more slots.")

    def _drop(self, entry: _Entry, free: bool = True) -> None:
        if free:
            for path in self._written.pop(entry.slot, set()):
                self._sites[path].clear(entry.slot)
        for key in entry.keys:
            if self._alias.get(key) == entry.ident:
                del self._alias[key]
        del self._entries[entry.ident]
        self.counters["evictions"] += 1
        if free:
            self._free.append(entry.slot)

    def _entry_of(self, adapter: Any) -> _Entry:
        self._require_open()
        ident = self._alias.get(_row_key(adapter, 0)) if adapter is not None else None
        if ident is None or ident not in self._entries:
            raise PoolError(f"{_label(adapter)} is not resident in this pool.\n  fix: pool.load() or pool.pin() it.")
        return self._entries[ident]

    def sites(self) -> Iterator[SlotSite]:
        """The installed per-module sites (for inspection)."""
        return iter(self._sites.values())


# --- helpers -------------------------------------------------------------------------------------


def _targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    out_layer = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    names = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]
    if isinstance(targets, str) and targets == "all-linear":
        return [n for n, m in names if m is not out_layer]
    wanted = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, Sequence) else None
    if wanted is None or isinstance(targets, bytes) or not all(isinstance(t, str) for t in wanted):
        raise PoolError(f"targets must be 'all-linear' or a list of module names, not {targets!r}.\n"
                        "  fix: e.g. targets=['q_proj', 'v_proj'].")
    return [n for n, _ in names if any(n == t or n.endswith("." + t) for t in wanted)]


def _slot_bytes(model: nn.Module, paths: list[str], slots: int, max_rank: int) -> int:
    """Bytes of the LoRA slot buffers a pool allocates for ``paths``."""
    total = 0
    for p in paths:
        w = model.get_submodule(p).weight
        total += (slots + 1) * max_rank * (w.shape[0] + w.shape[1]) * w.element_size()
    return total


def _batch_size(inputs: dict[str, Any], what: str) -> int:
    for name, dims in (("input_ids", 2), ("inputs_embeds", 3)):
        t = inputs.get(name)
        if isinstance(t, torch.Tensor):
            if t.dim() != dims:
                shape = "[batch, length]" if dims == 2 else "[batch, length, hidden]"
                raise PoolError(f"pool.{what}(): {name} has shape {list(t.shape)}, not {shape}.\n  fix: pass one row "
                                f"per adapter, e.g. {name}=t.unsqueeze(0) for a single sequence.")
            if t.shape[0] == 0:
                raise PoolError(f"pool.{what}(): {name} holds no rows.\n  fix: pass a batch of at least one row.")
            return int(t.shape[0])
    for t in inputs.values():
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    raise PoolError(f"pool.{what}() found no batched tensor among its inputs ({', '.join(inputs) or 'none'}).\n"
                    "  fix: pass input_ids=... (or inputs_embeds=...) with one row per adapter.")


def _label(row: Any) -> str:
    if isinstance(row, Block):
        return repr(row)
    if isinstance(row, Adapter):
        return label(row, 0)
    return str(row)


def _row_key(row: Any, i: int) -> Hashable:
    """What identifies a row's request before it is resolved: the reference string, the Adapter object, or
    a composition's structure over those."""
    if isinstance(row, Adapter):
        return _identity(row)  # never the id of a passing object: it may be reused once that object is gone
    if isinstance(row, Block):
        weights = row.weights
        extra = getattr(row, "normalize", None)
        return ("block", type(row).__name__, weights, extra, tuple(_row_key(c, i) for c in row.children))
    if isinstance(row, str):
        return ("ref", row)
    try:
        hash(row)
    except TypeError:
        raise PoolError(f"row {i}: {type(row).__name__} is not an adapter reference.\n  fix: give a registry "
                        "reference, a directory, an Adapter, a Sum/Stack/Average of them, or None.", row=i) from None
    return ("other", row)


def _identity(node: Any) -> Hashable:
    """What a resolved row is: an adapter read from disk by where it lives (a registry snapshot is named by
    its digest), an in-memory Adapter by object, a composition by its structure over those."""
    if isinstance(node, Block):
        return ("block", type(node).__name__, node.weights, getattr(node, "normalize", None),
                tuple(_identity(c) for c in node.children))
    cached = node.__dict__.get(_IDENT_ATTR)
    if cached is None:
        cached = node.__dict__[_IDENT_ATTR] = _adapter_identity(node)
    return cached


def _adapter_identity(node: Adapter) -> Hashable:
    """An adapter read from disk whose tensors all still come from its files: where it lives, its spec and where
    each tensor is (``replace(tensors=..., spec=...)`` keeps ``source`` but makes another adapter); anything else:
    the object itself (the pool keeps it alive while resident, so its id is not reused meanwhile)."""
    entries = node.tensors._entries
    if node.source is not None and all(isinstance(e, TensorInfo) for e in entries.values()):
        where = tuple(sorted((n, str(e.path), e.start, e.end) for n, e in entries.items()))
        return ("source", str(node.source), node.kind, repr(node.spec), where)
    return ("adapter", id(node))


def _row_error(i: int, row: Any, e: Exception, *, reports: list[object] | None = None) -> PoolError:
    lab = row if isinstance(row, str) else _label(row)
    return PoolError(f"row {i} ({lab}) cannot be served: {e}", row=i, ref=lab, reports=reports)

