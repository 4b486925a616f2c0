"""adapterhub: store, version, check, compose and ship adapters for shared base models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterhub.adapter import Adapter

__version__ = "0.1.0"


def load(ref: str, *, registry: str | Path | None = None, allow_pickle: bool = False) -> Adapter:
    """The Adapter a registry reference names (``NAME``, ``NAME@VERSION``, ``NAME@TAG``, ``NAME@sha256:HEX``).

    ``registry`` defaults to ``$ADAPTERHUB_REGISTRY``, else the per-user registry.
    """
    from adapterhub.registry import Registry

    return Registry(registry).load(ref, allow_pickle=allow_pickle)
