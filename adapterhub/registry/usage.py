"""Storage economics of a registry (``adapterhub du``): bytes stored, bytes saved by deduplication, and
what the same versions would cost as full merged copies of their bases.

A merged copy of a version is its base with the adapter folded in: as large as the base's parameters,
which ``push --base`` records in the manifest (``base_size``). Versions pushed without ``--base`` have
no recorded base size; they are counted apart (``unpriced``), never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterhub.errors import IntegrityError
from adapterhub.registry.registry import Registry, _version_key


@dataclass
class BaseUsage:
    """The versions made for one base: how many, their adapters' bytes, and their merged copies' bytes."""

    base: str
    versions: int = 0
    adapter_bytes: int = 0
    merged_bytes: int = 0
    unpriced: int = 0


@dataclass
class Usage:
    """``stored_bytes``: every blob in the store (orphans included); ``referenced_bytes``: the distinct blobs
    versions use; ``logical_bytes``: the files of every version counted once per version (what storing
    each version whole would take); ``dedup_saved_bytes`` = logical - referenced; ``merged_bytes``: the
    priced versions as full merged copies of their bases; ``unpriced``: versions without a recorded
    base size."""

    location: str
    versions: int = 0
    blobs: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0
    orphan_bytes: int = 0
    logical_bytes: int = 0
    dedup_saved_bytes: int = 0
    merged_bytes: int = 0
    priced_adapter_bytes: int = 0
    unpriced: int = 0
    damaged: int = 0
    bases: list[BaseUsage] = field(default_factory=list)

    @property
    def merged_ratio(self) -> float | None:
        """How many times larger the priced versions are as merged copies than as adapters."""
        return self.merged_bytes / self.priced_adapter_bytes if self.priced_adapter_bytes else None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "bases"}
        d["bases"] = [b.__dict__ for b in self.bases]
        d["merged_ratio"] = self.merged_ratio
        return d


def usage(registry: Registry) -> Usage:
    """Measure a registry (any store): one listing of the blobs, one read of every manifest."""
    u = Usage(registry.location)
    sizes = {b.digest: b.size for b in registry.store.list_blob_info()}
    u.blobs = len(sizes)
    u.stored_bytes = sum(sizes.values())
    referenced: set[str] = set()
    bases: dict[str, BaseUsage] = {}
    for name in registry.names():
        for v, d in sorted(registry._versions(name).items(), key=lambda vd: _version_key(vd[0])):
            try:
                m = registry._manifest(d, f"{name}@{v}")
            except IntegrityError:
                u.damaged += 1
                continue
            u.versions += 1
            size = sum(int(f.get("size") or 0) for f in m["files"])
            u.logical_bytes += size + sizes.get(d, 0)  # its files and its manifest
            referenced.add(d)
            referenced.update("sha256:" + f["sha256"] for f in m["files"])
            base = m.get("base") or {}
            key = base.get("name_or_path") or (base.get("fingerprint") or "")[:20] or "(base not recorded)"
            b = bases.setdefault(key, BaseUsage(key))
            b.versions += 1
            b.adapter_bytes += size
            base_size = m.get("base_size")
            if isinstance(base_size, int) and base_size > 0:
                b.merged_bytes += base_size
                u.merged_bytes += base_size
                u.priced_adapter_bytes += size
            else:
                b.unpriced += 1
                u.unpriced += 1
    u.referenced_bytes = sum(sizes.get(d, 0) for d in referenced)
    u.orphan_bytes = u.stored_bytes - u.referenced_bytes
    u.dedup_saved_bytes = max(0, u.logical_bytes - u.referenced_bytes)
    u.bases = sorted(bases.values(), key=lambda b: (-b.versions, b.base))
    return u
