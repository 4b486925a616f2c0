"""A base-model checkpoint seen through its config and safetensors headers; no weights are loaded.

Reads Hugging Face layout directories: ``config.json`` plus ``model.safetensors``, or shards listed
by ``model.safetensors.index.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from adapterhub.adapter import BaseModelRef
from adapterhub.errors import BaseCheckpointError, FormatError
from adapterhub.formats._files import read_json
from adapterhub.tensorfile import TensorInfo, read_header

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: bytes read at each of the sample points of a tensor for the fingerprint
SAMPLE_BYTES = 4096
SAMPLE_POINTS = 3
FINGERPRINT_VERSION = "fp1"
#: tensors only quantized checkpoints have: GPTQ/AWQ packed weights and zeros, bitsandbytes 4-bit quant state
#: and 8-bit row scales, compressed-tensors / fp8 scales
_QUANTIZED_TENSOR = re.compile(r"\.(qweight|qzeros|g_idx|absmax|nested_absmax|quant_map|nested_quant_map|SCB|"
                               r"weight_packed|weight_scale|weight_scale_inv|weight_zero_point)$|\.quant_state\.")


@dataclass(frozen=True)
class BaseCheckpoint:
    """A base checkpoint directory: its config and every weight's name, dtype, shape and location.

    Example:
        >>> base = BaseCheckpoint.open("path/to/llama")          # doctest: +SKIP
        >>> base.tensors["model.layers.0.self_attn.q_proj.weight"].shape  # doctest: +SKIP
        (4096, 4096)
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]

    @classmethod
    def open(cls, path: str | Path) -> BaseCheckpoint:
        """Read config and headers of a checkpoint directory.

        Raises:
            BaseCheckpointError: not a directory, no weights, a shard missing or damaged, or an index
                that names files or tensors that are not there.
        """
        path = Path(path)
        if not path.is_dir():
            raise BaseCheckpointError(f"{path} is not a directory; pass a Hugging Face model directory "
                                      "(config.json + model.safetensors or sharded safetensors).\n  fix: pass the "
                                      "folder that holds the base model's config.json and weights.", path=path)
        config: dict[str, Any] = {}
        if (path / "config.json").is_file():
            config = _read(path / "config.json")
        index_path = path / INDEX_NAME
        if index_path.is_file():
            tensors, files = _read_sharded(path, index_path)
        elif (path / SINGLE_NAME).is_file():
            header = _header(path / SINGLE_NAME)
            tensors, files = dict(header.tensors), (path / SINGLE_NAME,)
        else:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = (f" It has pickle weights ({', '.join(bins[:3])}); convert them to safetensors first."
                    if bins else "")
            raise BaseCheckpointError(
                f"{path} has no {SINGLE_NAME} and no {INDEX_NAME}.{hint}\n  fix: pass the folder that holds the "
                "base model's safetensors weights (download the model again if they are missing).", path=path)
        return cls(path=path, config=config, tensors=tensors, files=files)

    # --- what the config says --------------------------------------------------------------

    @cached_property
    def text_config(self) -> dict[str, Any]:
        """The language-model part of the config (``text_config`` for multimodal models)."""
        return self.config.get("text_config") or self.config

    @property
    def name_or_path(self) -> str | None:
        return self.config.get("_name_or_path") or None

    @property
    def model_type(self) -> str | None:
        """``config.json``'s ``model_type`` (``"llama"``, ``"bert"``), if it says."""
        value = self.config.get("model_type")
        return value if isinstance(value, str) and value else None

    @property
    def architectures(self) -> tuple[str, ...] | None:
        """``config.json``'s ``architectures`` (model class names), if it says."""
        value = self.config.get("architectures")
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        return None

    def identity(self, recorded: BaseModelRef | None = None) -> BaseModelRef:
        """What an adapter checked against this checkpoint records about its base: ``recorded``'s name and
        revision (else this checkpoint's name), and this checkpoint's fingerprint, model type and architectures."""
        recorded = recorded or BaseModelRef()
        return BaseModelRef(name_or_path=recorded.name_or_path or self.name_or_path, revision=recorded.revision,
                            fingerprint=self.fingerprint(), model_type=self.model_type or recorded.model_type,
                            architectures=self.architectures or recorded.architectures)

    @cached_property
    def quantization(self) -> dict[str, Any] | None:
        """How the checkpoint's weights are quantized, or None for a full-precision checkpoint.

        From ``config.json``'s ``quantization_config`` (GPTQ, AWQ, bitsandbytes, fp8 ...) or, without one,
        from tensors only quantized checkpoints have (GPTQ/AWQ ``qweight``/``qzeros``/``scales``,
        bitsandbytes ``absmax``/``quant_map``/``quant_state``/``SCB``). Returns ``{"method", "bits", "evidence"}``.
        """
        qc = self.config.get("quantization_config") or self.text_config.get("quantization_config")
        if isinstance(qc, dict) and qc:
            method = qc.get("quant_method")
            if not method and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
                method = "bitsandbytes"
            bits = qc.get("bits") or qc.get("w_bit") or (4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit")
                                                         else None)
            return {"method": str(method or "unknown"), "bits": bits, "evidence": "config.json quantization_config"}
        packed = sorted(n for n in self.tensors if _QUANTIZED_TENSOR.search(n))
        if packed:
            bnb = any(".absmax" in n or ".quant_state" in n or n.endswith(".SCB") or ".quant_map" in n for n in packed)
            return {"method": "bitsandbytes" if bnb else "gptq/awq", "bits": None,
                    "evidence": f"packed tensors such as {packed[0]}"}
        return None

    @property
    def hidden_size(self) -> int | None:
        c = self.text_config
        return c.get("hidden_size") or c.get("n_embd") or c.get("d_model")

    @property
    def num_layers(self) -> int | None:
        c = self.text_config
        return c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")

    @property
    def num_attention_heads(self) -> int | None:
        c = self.text_config
        return c.get("num_attention_heads") or c.get("n_head") or c.get("num_heads")

    @property
    def num_kv_heads(self) -> int | None:
        return self.text_config.get("num_key_value_heads") or self.num_attention_heads

    @property
    def head_dim(self) -> int | None:
        c = self.text_config
        if c.get("head_dim"):
            return int(c["head_dim"])
        if self.hidden_size and self.num_attention_heads:
            return self.hidden_size // self.num_attention_heads
        return None

    @cached_property
    def modules(self) -> dict[str, str]:
        """Module path -> its weight's tensor name (every tensor named ``<module>.weight``)."""
        return {n[: -len(".weight")]: n for n in self.tensors if n.endswith(".weight")}

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    # --- identity ---------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A digest of every tensor's name, dtype, shape and a fixed sample of its bytes.

        Two fine-tunes of one architecture differ in the sampled bytes, so they get different
        fingerprints; re-sharding or renaming files does not change it. Reads
        ``SAMPLE_POINTS * SAMPLE_BYTES`` bytes per tensor (about 3.5 MiB for a 7B model).
        """
        h = hashlib.sha256(FINGERPRINT_VERSION.encode())
        by_file: dict[Path, list[TensorInfo]] = {}
        for name in sorted(self.tensors):
            by_file.setdefault(self.tensors[name].path, []).append(self.tensors[name])
        samples: dict[str, bytes] = {}
        for file, infos in by_file.items():
            fd = os.open(file, os.O_RDONLY)
            try:
                for t in infos:
                    samples[t.name] = b"".join(os.pread(fd, n, off) for off, n in _sample_ranges(t))
            finally:
                os.close(fd)
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(json.dumps([name, t.dtype, list(t.shape)]).encode())
            h.update(hashlib.sha256(samples[name]).digest())
        return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def _sample_ranges(t: TensorInfo) -> list[tuple[int, int]]:
    """(offset, length) of the bytes sampled from a tensor: its start, middle and end."""
    size = t.nbytes
    if size <= SAMPLE_BYTES * SAMPLE_POINTS:
        return [(t.start, size)]
    step = (size - SAMPLE_BYTES) // (SAMPLE_POINTS - 1)
    return [(t.start + i * step, SAMPLE_BYTES) for i in range(SAMPLE_POINTS)]


def _read(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except FormatError as e:
        raise BaseCheckpointError(str(e), path=path) from e


def _header(path: Path):  # noqa: ANN202 - internal
    try:
        return read_header(path)
    except FormatError as e:
        raise BaseCheckpointError(f"{e}", path=path) from e


_REFETCH = "the index is damaged or was edited; download the checkpoint again."


def _read_sharded(path: Path, index_path: Path) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    index = _read(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BaseCheckpointError(f"{index_path} has no 'weight_map'.\n  fix: {_REFETCH}", path=index_path)
    if not all(isinstance(shard, str) and shard for shard in weight_map.values()):
        raise BaseCheckpointError(f"{index_path}: every 'weight_map' value must be a shard file name.\n  fix: "
                                  f"{_REFETCH}", path=index_path)
    tensors: dict[str, TensorInfo] = {}
    files: list[Path] = []
    for shard in sorted(set(weight_map.values())):
        shard_path = path / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts or shard_path.parent != path:
            raise BaseCheckpointError(f"{index_path} names shard {shard!r} outside the checkpoint directory.\n"
                                      f"  fix: {_REFETCH}", path=index_path)
        if not shard_path.is_file():
            raise BaseCheckpointError(
                f"{index_path} names shard {shard!r}, which is missing from {path}.\n"
                "  fix: download the missing shard (or the whole checkpoint) again.", path=shard_path)
        header = _header(shard_path)
        files.append(shard_path)
        for name, info in header.tensors.items():
            tensors[name] = info
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.path.name != shard:
            raise BaseCheckpointError(
                f"{index_path} says tensor '{name}' is in {shard!r}, but that shard does not hold it.\n"
                "  fix: the index and shards come from different downloads; fetch the checkpoint again.",
                path=index_path)
    return tensors, tuple(files)
