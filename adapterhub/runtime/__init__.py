"""Runtime composition: attach, stack, weight, swap and detach adapters on a live transformers model.

``Sum``, ``Stack`` and ``Average`` import without torch; ``attach`` and ``Attached`` import it on
first use. The runtime takes :class:`~adapterhub.adapter.Adapter` values and never reads the
registry (``adapterhub.attach`` resolves references and directories, then calls :func:`attach`).
"""

from __future__ import annotations

from typing import Any

from adapterhub.runtime.compose import Average, Block, Stack, Sum

__all__ = ["Attached", "Average", "Block", "Stack", "Sum", "attach", "attached_to"]


def __getattr__(name: str) -> Any:
    if name in ("attach", "Attached", "attached_to"):
        from adapterhub.runtime import attached as module

        return getattr(module, name)
    raise AttributeError(f"module 'adapterhub.runtime' has no attribute {name!r}")
