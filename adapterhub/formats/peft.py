"""PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``): LoRA, IA3, prefix.

This is the layout PEFT's ``PeftModel.from_pretrained`` and vLLM load. Reading keeps PEFT's config
verbatim in ``Adapter.extra["peft"]`` so that writing it back reproduces the original.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterhub import _json
from adapterhub.adapter import Adapter, BaseModelRef, Tensors, check_layout, split_name
from adapterhub.errors import CorruptFileError, InvalidValueError, UnsupportedAdapterError
from adapterhub.formats import peft_config
from adapterhub.formats._files import atomic_directory, dump_json, load_weights, read_json
from adapterhub.tensorfile import save_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin",)
PREFIX = "base_model.model."
FINGERPRINT_KEY = "adapterhub.base_fingerprint"
MODEL_TYPE_KEY = "adapterhub.base_model_type"
ARCHITECTURES_KEY = "adapterhub.base_architectures"
#: safetensors metadata key holding ``Adapter.extra["extract"]`` (per-module error, lineage) as JSON
EXTRACT_KEY = "adapterhub.extract"
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix"}

def is_peft_config(config: dict[str, Any]) -> bool:
    """True when an ``adapter_config.json`` was written by PEFT (it carries ``peft_type``)."""
    return "peft_type" in config


def read(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT adapter directory: every config field honoured as PEFT honours it, or refused
    (docs/peft-config-fields.md).

    Weights the config does not apply (modules it does not target, training-only state) are left out
    of the Adapter, as PEFT ignores them when loading; ``extra["ignored"]`` names each with the reason.

    Raises:
        MissingFileError, CorruptFileError: missing or damaged files.
        PickleRefusedError: only ``adapter_model.bin`` exists and ``allow_pickle`` is false.
        InvalidValueError, NonFiniteError: a config field holds an unusable value (named in the message).
        UnsupportedAdapterError: a PEFT type or option adapterhub cannot reproduce exactly.
    """
    path = Path(path)
    config = read_json(path / CONFIG_NAME)
    peft_type = config.get("peft_type")
    kind = PEFT_TYPES.get(str(peft_type))
    if kind is None:
        raise UnsupportedAdapterError(
            f"{path}: PEFT type {peft_type!r} is not supported; adapterhub reads "
            f"{', '.join(PEFT_TYPES)}.\n  fix: merge this adapter with PEFT (merge_and_unload), or use a LoRA, IA3 or "
            "prefix-tuning adapter.", path=path)
    entries, metadata = load_weights(path, WEIGHTS_NAME, PICKLE_NAMES, allow_pickle=allow_pickle)
    stray = sorted(k for k in entries if not k.startswith(PREFIX)) if kind != "prefix" else []
    if stray:  # PEFT matches weights to its modules by the full name: these match none and are dropped
        raise CorruptFileError(
            f"{path}: {len(stray)} of {len(entries)} weight(s) lack PEFT's '{PREFIX}' name prefix (e.g. '{stray[0]}'); "
            "PEFT loads none of them, so the adapter would apply nothing there.\n  fix: save the adapter with PEFT's "
            f"save_pretrained, or rename each weight to '{PREFIX}<name>'.", path=path)
    tensors = {_to_canonical(kind, k): v for k, v in entries.items()}
    if len(tensors) != len(entries):
        raise CorruptFileError(f"{path / WEIGHTS_NAME}: two tensor names map to the same module.\n  fix: save the "
                               "adapter again with PEFT's save_pretrained.", path=path)
    shapes = {n: tuple(v.shape) for n, v in tensors.items()}
    try:
        found = peft_config.interpret(str(peft_type), config, shapes, lambda n: split_name(kind, n))
    except InvalidValueError as e:
        e.args = (with_fix(f"{path / CONFIG_NAME}: {e}"),)
        e.path = path / CONFIG_NAME
        raise
    except UnsupportedAdapterError as e:
        raise UnsupportedAdapterError(with_fix(f"{path}: {e}"), path=path) from e
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(with_fix(f"{path / CONFIG_NAME}: invalid {peft_type} config ({e!r})."),
                               path=path) from e
    model_type, archs = peft_config.architecture(config)
    recorded = metadata.get(ARCHITECTURES_KEY)
    base = BaseModelRef(
        name_or_path=config.get("base_model_name_or_path"),
        revision=config.get("revision"),
        fingerprint=metadata.get(FINGERPRINT_KEY),
        model_type=metadata.get(MODEL_TYPE_KEY) or model_type,
        architectures=tuple(recorded.split(",")) if recorded else archs,
    )
    extra: dict[str, Any] = {"peft": config}
    if EXTRACT_KEY in metadata:
        try:
            extra["extract"] = _json.loads(metadata[EXTRACT_KEY])
        except ValueError as e:
            raise CorruptFileError(f"{path / WEIGHTS_NAME}: metadata '{EXTRACT_KEY}' is not valid JSON ({e}).",
                                   path=path) from e
    if found.ignored:
        extra["ignored"] = dict(sorted(found.ignored.items()))
    kept = {n: v for n, v in tensors.items() if n not in found.ignored}
    adapter = Adapter(kind=kind, spec=found.spec, tensors=Tensors(kept), base=base, extra=extra, source=path)
    _check_pairs(adapter, path)
    check_layout(adapter)
    if adapter.kind == "lora" and adapter.spec.use_dora:
        _check_dora(adapter, path)
    return adapter


FIX_CONFIG = ("  fix: correct the field in adapter_config.json (docs/peft-config-fields.md says what adapterhub "
              "accepts for each), or merge the adapter with PEFT.")


def with_fix(message: str) -> str:
    """``message`` with the generic config fix line when it has none."""
    return message if "\n  fix: " in message else f"{message}\n{FIX_CONFIG}"


def _check_dora(adapter: Adapter, path: Path) -> None:
    """DoRA needs a magnitude vector per adapted module: without one PEFT renormalises every column to the
    base weight's norm, which is neither plain LoRA nor the trained adapter."""
    missing = [m for m in adapter.modules() if "lora_magnitude_vector" not in adapter.module_tensors(m)]
    if missing:
        raise CorruptFileError(
            f"{path}: use_dora is true but {len(missing)} of {len(adapter.modules())} module(s) have no "
            f"lora_magnitude_vector (e.g. {missing[0]}); the adapter cannot be applied as trained.\n"
            "  fix: restore the weights file saved with the adapter, or set use_dora to false only if it was "
            "trained as plain LoRA.", path=path)


def _to_canonical(kind: str, key: str) -> str:
    if kind == "prefix":
        return key
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    for p in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if key.endswith(f".{p}.weight"):
            return key[: -len(".weight")]
    return key


def _to_peft(kind: str, name: str) -> str:
    if kind == "prefix":
        return name
    s = split_name(kind, name)
    if s and s[1] in ("lora_A", "lora_B"):
        return f"{PREFIX}{name}.weight"
    return PREFIX + name


def _check_pairs(adapter: Adapter, path: Path) -> None:
    if adapter.kind == "prefix":
        if "prompt_embeddings" not in adapter.tensors:
            raise CorruptFileError(f"{path}: a prefix-tuning adapter needs a 'prompt_embeddings' tensor.\n  fix: the "
                                   "weights file is incomplete; re-export the adapter.", path=path)
        return
    # LoRA pairs and shapes: adapterhub.adapter.check_layout


def config_for(adapter: Adapter) -> dict[str, Any]:
    """The PEFT ``adapter_config.json`` content for an adapter (its original one updated from the spec)."""
    if adapter.kind == "bottleneck":
        raise UnsupportedAdapterError(
            "PEFT has no bottleneck adapters.\n  fix: write this adapter in the `adapters` library format instead "
            "(--format adapters).")
    if adapter.kind == "prefix" and adapter.spec.layout != "peft":
        raise UnsupportedAdapterError(
            f"this prefix-tuning adapter is stored in the `adapters` library's '{adapter.spec.layout}' layout; "
            "PEFT cannot read that layout.\n  fix: convert it with adapterhub.formats.adapters_lib.prefix_to_peft() "
            "first (CLI: pass --base).")
    config = dict(adapter.extra.get("peft") or {})
    peft_type = {v: k for k, v in PEFT_TYPES.items()}[adapter.kind]
    if config.get("peft_type") != peft_type:
        config = {}
    s = adapter.spec
    config.update({"peft_type": peft_type, "base_model_name_or_path": adapter.base.name_or_path,
                   "revision": adapter.base.revision})
    config.setdefault("inference_mode", True)
    config.setdefault("task_type", None)
    if adapter.kind == "lora":
        config.update({
            "r": s.r, "lora_alpha": s.alpha, "use_rslora": s.use_rslora, "rank_pattern": dict(s.rank_pattern),
            "alpha_pattern": dict(s.alpha_pattern), "fan_in_fan_out": s.fan_in_fan_out, "use_dora": s.use_dora,
            "lora_bias": s.lora_bias, "modules_to_save": list(s.modules_to_save) or None,
            "target_modules": _targets(adapter, s.target_modules),
        })
        config.setdefault("bias", "none")
        config.setdefault("lora_dropout", 0.0)
        config.setdefault("init_lora_weights", True)
        for variant in ("velora_config", "monteclora_config"):  # training-only: their tensors were not kept
            if config.get(variant):
                config[variant] = None
    elif adapter.kind == "ia3":
        config.update({
            "target_modules": _targets(adapter, s.target_modules),
            "feedforward_modules": _listify(s.feedforward_modules),
            "fan_in_fan_out": s.fan_in_fan_out, "modules_to_save": list(s.modules_to_save) or None,
        })
        config.setdefault("init_ia3_weights", True)
    else:
        config.update({
            "num_virtual_tokens": s.num_virtual_tokens, "num_layers": s.num_layers,
            "num_attention_heads": s.num_kv_heads, "token_dim": s.token_dim,
            "num_transformer_submodules": s.num_transformer_submodules,
        })
        config.setdefault("prefix_projection", False)
        config.setdefault("encoder_hidden_size", s.token_dim)
        if config.get("task_type") is None:
            config["task_type"] = "CAUSAL_LM"
    return config


def _listify(v: tuple[str, ...] | str | None) -> list[str] | str | None:
    return list(v) if isinstance(v, tuple) else v


def _targets(adapter: Adapter, targets: tuple[str, ...] | str | None) -> list[str] | str:
    if targets is not None:
        return _listify(targets)
    # Unknown: name every module exactly, so PEFT adds LoRA/IA3 layers to these and no others.
    return adapter.modules()


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adapter`` as a PEFT directory that ``PeftModel.from_pretrained`` loads.

    The directory is built beside ``path`` and renamed into place, so a failure leaves nothing.
    """
    path = Path(path)
    config = config_for(adapter)
    tensors = {_to_peft(adapter.kind, n): adapter.tensors[n] for n in adapter.tensors}
    metadata = {"format": "pt"}
    if adapter.base.fingerprint:
        metadata[FINGERPRINT_KEY] = adapter.base.fingerprint
    if adapter.base.model_type:
        metadata[MODEL_TYPE_KEY] = adapter.base.model_type
    if adapter.base.architectures:
        metadata[ARCHITECTURES_KEY] = ",".join(adapter.base.architectures)
    if "extract" in adapter.extra:
        metadata[EXTRACT_KEY] = json.dumps(adapter.extra["extract"], sort_keys=True, separators=(",", ":"))
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(dump_json(config), encoding="utf-8")
        save_tensors(tensors, tmp / WEIGHTS_NAME, metadata)
    return path


__all__ = ["read", "write", "config_for", "is_peft_config"]
