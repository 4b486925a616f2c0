"""Runtime composition: attach, stack, weight, swap and detach adapters on a live transformers model.

``Sum``, ``Stack`` and ``Average`` import without torch; ``attach`` and ``Attached`` import it on
first use, as does ``Pool`` (one adapter per batch row, :mod:`adapterhub.runtime.pool`). The runtime
takes :class:`~adapterhub.adapter.Adapter` values and never reads the registry (``adapterhub.attach`` and
``adapterhub.Pool`` resolve references and directories, then call the runtime).
"""

from __future__ import annotations

from typing import Any

from adapterhub.runtime.compose import Average, Block, Stack, Sum

__all__ = ["Attached", "Average", "Block", "Pool", "Stack", "Sum", "attach", "attached_to"]


def __getattr__(name: str) -> Any:
    if name in ("attach", "Attached", "attached_to"):
        from adapterhub.runtime import attached as module

        return getattr(module, name)
    if name == "Pool":
        from adapterhub.runtime.pool import Pool

        return Pool
    raise AttributeError(f"module 'adapterhub.runtime' has no attribute {name!r}")
