"""The registry-aware adapter pool: ``adapterhub.Pool(model, registry=PATH, slots=S, max_rank=R)``.

The runtime's :class:`adapterhub.runtime.pool.Pool` takes Adapter values and a resolver and never reads
the registry; this module, above it, gives it one: a row that is a string is a directory (an existing
path, or one written ``./``, ``/``, ``~``) read in its format, or a registry reference read from the
registry's blobs (hash-checked, or trusted by their stamp as ``pull --link`` trusts them; tensors
memory-mapped), exactly as ``adapterhub.attach`` resolves leaves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from adapterhub.runtime.pool import Pool as _RuntimePool

__all__ = ["Pool"]


class Pool(_RuntimePool):
    """An adapter pool whose rows may be registry references and adapter directories.

    Args:
        model: the live transformers model (see :class:`adapterhub.runtime.pool.Pool`).
        registry: a path, a :class:`~adapterhub.registry.Registry`, or None for ``$ADAPTERHUB_REGISTRY`` /
            the per-user registry (opened on the first reference, once).
        slots, max_rank, targets: as :class:`adapterhub.runtime.pool.Pool`.
        allow_pickle: let directories with pickle weights be read (trusted input only).

    A reference is resolved when its adapter is loaded: a tag moved later is seen after
    :meth:`evict` (or once the adapter was evicted for room). Two references to one version share a slot.

    Example:
        >>> import adapterhub
        >>> pool = adapterhub.Pool(model, registry="path/to/registry", slots=64, max_rank=16)  # doctest: +SKIP
        >>> logits = pool.forward(adapters=["team/a@prod", None, "team/b@2"], input_ids=ids).logits  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, registry: Any = None, slots: int = 8, max_rank: int = 16,
                 targets: str | Sequence[str] = "all-linear", allow_pickle: bool = False) -> None:
        opened: list[Any] = []

        def get_registry() -> Any:
            if not opened:
                if registry is None or isinstance(registry, str | os.PathLike):
                    from adapterhub.registry import Registry

                    # a pool only reads: a mistyped path is refused, never made a registry (the default is made)
                    opened.append(Registry(registry, create=registry is None))
                else:
                    opened.append(registry)
            return opened[0]

        def resolve(leaf: Any) -> Any:
            from adapterhub import resolve_adapter
            from adapterhub.sources import looks_like_path

            if isinstance(leaf, str) and not looks_like_path(leaf):
                return get_registry().load(leaf, allow_pickle=allow_pickle)  # verified or stamp-trusted blobs
            return resolve_adapter(leaf, registry=get_registry, allow_pickle=allow_pickle)

        super().__init__(model, slots=slots, max_rank=max_rank, targets=targets, resolve=resolve)
