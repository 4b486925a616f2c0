"""adapterhub: store, version, check, compose and ship adapters for shared base models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterhub.adapter import Adapter
    from adapterhub.runtime.attached import Attached

__version__ = "0.1.0"

#: names served lazily, so that ``import adapterhub`` imports neither torch nor the runtime
_LAZY = {"Sum": "adapterhub.runtime.compose", "Stack": "adapterhub.runtime.compose",
         "Average": "adapterhub.runtime.compose", "Attached": "adapterhub.runtime.attached",
         "extract": "adapterhub.extraction",
         "Pool": "adapterhub.serving"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapterhub' has no attribute {name!r}")


def load(ref: str, *, registry: str | Path | None = None, allow_pickle: bool = False) -> Adapter:
    """The Adapter a registry reference names (``NAME``, ``NAME@VERSION``, ``NAME@TAG``, ``NAME@sha256:HEX``).

    ``registry`` defaults to ``$ADAPTERHUB_REGISTRY``, else the per-user registry.
    """
    from adapterhub.registry import Registry

    return Registry(registry).load(ref, allow_pickle=allow_pickle)


def attach(model: Any, composition: Any, *, registry: Any = None, allow_pickle: bool = False,
           merge: bool = False, prefix_positions: str = "auto") -> Attached:
    """Apply a composition to a live transformers model without touching its weights.

    A leaf of ``composition`` is an :class:`~adapterhub.adapter.Adapter`, an adapter directory (any
    format) or a registry reference (resolved as ``blend``/``export`` resolve sources; ``registry``
    is a path, a Registry or None for the default); blocks are ``Sum``, ``Stack`` and ``Average``.
    Everything is read and checked against the model before anything is attached. See
    :func:`adapterhub.runtime.attached.attach` for the options and errors.

    Example:
        >>> from adapterhub import attach, Stack, Sum
        >>> with attach(model, Stack("bn-task", Sum("team/a@prod", "lora-b", weights=[0.7, 0.3]))):  # doctest: +SKIP
        ...     out = model(**batch)
    """
    from adapterhub.runtime.attached import attach as _attach

    return _attach(model, composition, merge=merge, prefix_positions=prefix_positions,
                   resolve=lambda leaf: resolve_adapter(leaf, registry=registry, allow_pickle=allow_pickle))


def resolve_adapter(leaf: Any, *, registry: Any = None, allow_pickle: bool = False) -> Adapter:
    """An Adapter as is; a path (``os.PathLike``, or a string that exists or starts with ``/ ./ ../ ~``) read
    in its format; any other string a registry reference (``registry``: a path, a Registry, a function
    returning one, or None for ``$ADAPTERHUB_REGISTRY`` / the per-user registry)."""
    from adapterhub.adapter import Adapter

    if isinstance(leaf, Adapter):
        return leaf
    if isinstance(leaf, os.PathLike):
        from adapterhub.formats import read_adapter

        return read_adapter(Path(leaf).expanduser(), allow_pickle=allow_pickle)
    if isinstance(leaf, str):
        from adapterhub.sources import open_sources

        def opened() -> Any:
            if registry is None or isinstance(registry, str | os.PathLike):
                from adapterhub.registry import Registry

                return Registry(registry)
            return registry() if callable(registry) else registry

        return open_sources([leaf], opened, allow_pickle=allow_pickle)[0].adapter
    from adapterhub.errors import CompositionError

    raise CompositionError(f"a composition leaf must be an Adapter, an adapter directory or a registry reference, "
                           f"not {type(leaf).__name__}.\n  fix: pass adapterhub.open(PATH), a directory path or "
                           "NAME@VERSION.")
