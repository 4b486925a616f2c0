"""Merged-checkpoint export: a base checkpoint with adapters folded in, written as a standard sharded
safetensors checkpoint (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``) that
transformers and vLLM load as is.

Streaming: every output header is computed up front from the base's headers, then tensors are read,
folded and written one at a time, so peak memory is about one tensor (plus its float32 copy while
folding), whatever the model's size. The checkpoint is built in a directory beside the target and
renamed into place: an interrupted export leaves nothing at the target.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.adapter import Adapter
from adapterhub.base import BaseCheckpoint
from adapterhub.compose.merge import MergePlan, fold, plan_merge
from adapterhub.errors import AdapterHubError
from adapterhub.tensorfile import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo, load_tensor

if TYPE_CHECKING:
    import torch

#: files copied from the base directory when present
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
          "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16"}


class ExportError(AdapterHubError, ValueError):
    """An export could not be done; nothing was written at the target."""


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ExportError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 2GiB.")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(m.group(1)) * base**power)


@dataclass
class ExportResult:
    """Where the checkpoint went and what it holds."""

    path: Path
    shards: list[str]
    total_size: int
    folded: list[str]
    unmerged: list[str] = field(default_factory=list)


def _shard_plan(tensors: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(tensors):
        nbytes = math.ceil(math.prod(shape) * DTYPE_SIZES[dtype])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Serialized safetensors header (padded to 8 bytes) and each tensor's byte size."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        nbytes = math.ceil(math.prod(shape) * DTYPE_SIZES[dtype])
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def export_merged(base_dir: str | Path, adapters: Sequence[Adapter], out: str | Path, *,
                  weights: Sequence[float] | None = None, max_shard_size: str | int = "5GB",
                  dtype: str | None = None, keep_unmerged: bool = False, provenance: dict[str, Any] | None = None,
                  overwrite: bool = False) -> ExportResult:
    """Write ``base`` with ``adapters`` folded in as an HF-layout safetensors checkpoint at ``out``.

    Args:
        weights: one per adapter (LoRA deltas scale by it; IA3 needs 1).
        max_shard_size: e.g. ``"5GB"``; one ``model.safetensors`` when everything fits.
        dtype: output dtype of floating tensors (``bfloat16``, ``float16``, ``float32``); default the base's.
        keep_unmerged: write prefix/bottleneck adapters (which cannot be folded) beside the checkpoint
            under ``unmerged/`` instead of refusing.
        provenance: recorded in every shard's metadata and in the model card.

    Raises:
        ExportError, MergeError, CompatibilityError, BaseCheckpointError: nothing is written at ``out``.

    Memory: about one tensor at a time (its float32 copy while folding), independent of model size.
    """
    from adapterhub.formats import write_adapter
    from adapterhub.formats._files import atomic_directory

    base = BaseCheckpoint.open(base_dir)
    adapters = list(adapters)
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    foldable = [(a, w) for a, w in zip(adapters, weights, strict=True) if a.kind in ("lora", "ia3")]
    unfoldable = [a for a in adapters if a.kind not in ("lora", "ia3")]
    if unfoldable and not keep_unmerged:
        kinds = ", ".join(sorted({a.kind for a in unfoldable}))
        raise ExportError(f"{len(unfoldable)} adapter(s) of kind {kinds} cannot be folded into weights (they add "
                          "computation). Export refuses to drop them silently.\n  fix: pass --keep-unmerged to write "
                          "them beside the checkpoint under unmerged/, or export without them.")
    plan = plan_merge(base, [a for a, _ in foldable], [w for _, w in foldable]) if foldable else MergePlan([], [])
    out_dtype = None
    if dtype is not None:
        out_dtype = DTYPE_NAMES.get(dtype.lower())
        if out_dtype is None:
            raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPE_NAMES))}.")
    names = list(base.tensors)  # base order: shard by shard as the base is laid out
    entries = []
    for n in names:
        info = base.tensors[n]
        dt = out_dtype if (out_dtype and info.dtype in FLOAT_DTYPES) else info.dtype
        entries.append((n, dt, info.shape))
    shards = _shard_plan(entries, parse_size(max_shard_size))
    provenance = dict(provenance or {})
    provenance.setdefault("base", str(base.path))
    provenance.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
    metadata = {"format": "pt", "adapterhub.provenance": json.dumps(provenance, sort_keys=True)}
    out = Path(out)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_directory(out, overwrite=overwrite) as tmp:
        try:
            for fname, idx in zip(files, shards, strict=True):
                shard_entries = [entries[i] for i in idx]
                head, sizes = _header(shard_entries, metadata)
                with open(tmp / fname, "wb") as f:
                    f.write(head)
                    for (name, dt, _), nbytes in zip(shard_entries, sizes, strict=True):
                        info = base.tensors[name]
                        if not plan.touches(name) and dt == info.dtype:
                            f.flush()  # untouched: copy the bytes in the kernel, no tensor in memory
                            _copy_range(info, f.fileno())
                        else:
                            t = _merged_tensor(info, plan, dt)
                            data = _tensor_bytes(t)
                            if len(data) != nbytes:
                                raise ExportError(f"{name}: {len(data)} bytes, header says {nbytes}.")
                            f.write(data)
                            del t, data
                        weight_map[name] = fname
                        total += nbytes
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            from adapterhub.registry.store import _storage_error

            raise _storage_error(e, f"writing the merged checkpoint to {out}") from e
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for extra in COPIED:
            src = base.path / extra
            if src.is_file():
                shutil.copyfile(src, tmp / extra)
        if out_dtype and (tmp / "config.json").is_file():
            config = json.loads((tmp / "config.json").read_text())
            torch_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[out_dtype]
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = torch_name
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        unmerged = []
        for i, a in enumerate(unfoldable):
            label = re.sub(r"[^a-z0-9._-]+", "-", str(a.name or f"adapter-{i}").lower()).strip("-") or f"adapter-{i}"
            fmt = "adapters" if a.kind == "bottleneck" else "peft"
            if a.kind == "prefix" and a.spec.layout != "peft":
                fmt = "adapters"
            write_adapter(a, tmp / "unmerged" / f"{i:02d}-{label}", format=fmt)
            unmerged.append(f"unmerged/{i:02d}-{label}")
        (tmp / "README.md").write_text(_model_card(base, provenance, plan, unmerged), encoding="utf-8")
    return ExportResult(out, files, total, sorted(plan.folds), unmerged)


def _copy_range(info: TensorInfo, out_fd: int) -> None:
    """Append a tensor's raw bytes from its base file to ``out_fd`` (copy_file_range, else read/write)."""
    with open(info.path, "rb") as src:
        offset, left = info.start, info.nbytes
        while left:
            try:
                n = os.copy_file_range(src.fileno(), out_fd, left, offset)
            except OSError:  # e.g. across file systems on old kernels
                n = 0
            if n == 0:
                src.seek(offset)
                chunk = src.read(min(left, 64 * 1024 * 1024))
                if not chunk:
                    raise ExportError(f"{info.path} ended early while copying {info.name}.")
                os.write(out_fd, chunk)
                n = len(chunk)
            offset += n
            left -= n


def _merged_tensor(info: TensorInfo, plan: MergePlan, out_dtype: str) -> torch.Tensor:
    from adapterhub.dtypes import st_to_torch

    t = fold(info.name, load_tensor(info, cached=False), plan)
    target = st_to_torch(out_dtype)
    return t if t.dtype == target else t.to(target)


def _model_card(base: BaseCheckpoint, provenance: dict[str, Any], plan: MergePlan, unmerged: list[str]) -> str:
    lines = ["---", "library_name: transformers", "tags: [adapterhub, merged]", "---", "",
             f"# {base.name_or_path or base.path.name} with adapters merged", "",
             "Exported by adapterhub: the adapters below are folded into the base weights (float32 accumulation, "
             "rounded once to the output dtype).", "", "## Provenance", "", "```json",
             json.dumps(provenance, indent=2, sort_keys=True), "```", "",
             f"Folded into {len(plan.folds)} base tensors."]
    if unmerged:
        lines += ["", "## Not merged", "", "These adapters add computation and cannot be folded; they are written "
                  "beside the checkpoint and must be loaded as adapters:", ""] + [f"- `{u}`" for u in unmerged]
    return "\n".join(lines) + "\n"
