"""``adapters`` library directories: bottleneck adapters, LoRA and prefix tuning.

The library writes ``adapter_config.json`` (a document with ``config``, ``model_class``,
``model_name``, ``name`` ...) and ``adapter.safetensors`` or the pickle ``pytorch_adapter.bin``.
Tensor keys embed the adapter's name (``...output.adapters.<name>.adapter_up.weight``); canonical
names drop it, and writing puts ``Adapter.name`` back. Prediction heads (``head_config.json``)
are not adapters and are not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adapterhub.adapter import (
    Adapter,
    BaseModelRef,
    BottleneckSpec,
    LoraSpec,
    PrefixSpec,
    Tensors,
    check_layout,
    check_number,
)
from adapterhub.errors import CorruptFileError, InvalidValueError, UnsupportedAdapterError
from adapterhub.formats._files import atomic_directory, dump_json, load_weights, read_json
from adapterhub.tensorfile import save_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PICKLE_NAMES = ("pytorch_adapter.bin",)
LIBRARY_VERSION = "adapters.1.3.0"
KEEP_PEFT = "\n  fix: keep this adapter in PEFT format (--format peft), which PEFT and vLLM load."

# container segment -> how the adapter's name follows it in a key
_NAME_AFTER = re.compile(r"(^|\.)(loras|adapters|prefix_tunings)\.([^.]+)\.")

#: module-name conventions the ``adapters`` library's LoRA placement knows, by leaf name
_ATTN_MATRIX = {"query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v",
                "q": "q", "k": "k", "v": "v", "c_attn": "qkv"}
# Where ``intermediate_lora`` / ``output_lora`` put LoRA, per the library's model mixins. Note its
# Llama and Mistral mixins wrap ``mlp.down_proj`` as "intermediate" and ``mlp.up_proj`` as "output".
_INTERMEDIATE = re.compile(r"(^|\.)(intermediate\.dense|mlp\.down_proj|fc1|ffn\.lin1|fc_in|ffn)$")
_OUTPUT = re.compile(r"(^|\.)(\d+\.output\.dense|mlp\.up_proj|fc2|ffn\.lin2|fc_out|ffn_output)$")


def is_adapters_config(config: dict[str, Any]) -> bool:
    """True when an ``adapter_config.json`` was written by the ``adapters`` library."""
    return "peft_type" not in config and isinstance(config.get("config"), dict) and (
        "model_class" in config or str(config.get("version", "")).startswith("adapters"))


def architecture_of(config: dict[str, Any]) -> str:
    """The adapter architecture a library config describes: ``lora``, ``prefix_tuning``,
    ``seq_bn`` (Pfeiffer), ``double_seq_bn`` (Houlsby), ``par_bn`` or ``bottleneck``."""
    arch = config.get("architecture")
    if arch:
        return str(arch)
    if config.get("is_parallel"):
        return "par_bn"
    if config.get("mh_adapter") and config.get("output_adapter"):
        return "double_seq_bn"
    if config.get("output_adapter") and not config.get("mh_adapter"):
        return "seq_bn"
    return "bottleneck"


def read(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read an ``adapters``-library adapter directory.

    Raises:
        MissingFileError, CorruptFileError, PickleRefusedError: as for every format.
        UnsupportedAdapterError: gated LoRA, VeRA, (IA)^3-as-LoRA, DoRA, fusion or union configs.
    """
    path = Path(path)
    doc = read_json(path / CONFIG_NAME)
    if not is_adapters_config(doc):
        raise CorruptFileError(f"{path / CONFIG_NAME} is not an `adapters` library config.\n  fix: pass a directory "
                               "saved by the `adapters` library (model.save_adapter).", path=path)
    config = doc["config"]
    name = doc.get("name")
    arch = architecture_of(config)
    entries, _ = load_weights(path, WEIGHTS_NAME, PICKLE_NAMES, allow_pickle=allow_pickle)
    tensors: dict[str, Any] = {}
    for key, entry in entries.items():
        canonical = _to_canonical(key, name, path)
        if canonical is None:
            continue  # a duplicate alias the library saves for prefix tuning (``<layer>.prefix_tuning.pool``)
        tensors[canonical] = entry
    if not tensors:
        raise CorruptFileError(f"{path}: no adapter tensors named after adapter '{name}'.\n  fix: the config's 'name' "
                               "must be the name the weights were saved under; save the adapter again with the "
                               "`adapters` library.", path=path)
    model_class, model_type = doc.get("model_class"), doc.get("model_type")
    base = BaseModelRef(name_or_path=doc.get("model_name"),
                        model_type=model_type if isinstance(model_type, str) else None,
                        architectures=(model_class,) if isinstance(model_class, str) and model_class else None)
    view = Tensors(tensors)
    try:
        kind, spec = _spec(arch, config, doc, view, path)
    except InvalidValueError as e:
        from adapterhub.formats.peft import with_fix

        e.args = (with_fix(f"{path / CONFIG_NAME}: {e}"),)
        e.path = path / CONFIG_NAME
        raise
    adapter = Adapter(kind=kind, spec=spec, tensors=view, base=base, name=name, extra={"adapters": doc}, source=path)
    check_layout(adapter)
    return adapter


def _to_canonical(key: str, name: str | None, path: Path | None = None) -> str | None:
    if ".prefix_tuning.pool." in key:
        return None
    m = _NAME_AFTER.search(key)
    if m is None or (name is not None and m.group(3) != name):
        raise CorruptFileError(
            f"{path or 'the weights'}: tensor '{key}' does not name adapter '{name}' where the library puts it.\n"
            "  fix: the config's 'name' must be the name the weights were saved under; save the adapter again with "
            "the `adapters` library.", path=path)
    container = m.group(2)
    head, tail = key[: m.start()], key[m.end():]
    lead = m.group(1)
    if container == "loras":
        return f"{head}{lead}{tail}"
    return f"{head}{lead}{container}.{tail}"


def _to_library(canonical: str, name: str, kind: str) -> str:
    if kind == "lora":
        module, _, param = canonical.rpartition(".")
        return f"{module}.loras.{name}.{param}"
    m = re.search(r"(^|\.)(adapters|prefix_tunings)\.", canonical)
    if m is None:
        raise UnsupportedAdapterError(f"tensor '{canonical}' has no place in an `adapters` library checkpoint."
                                      + KEEP_PEFT)
    return f"{canonical[: m.end()]}{name}.{canonical[m.end():]}"


def _spec(arch: str, config: dict[str, Any], doc: dict[str, Any], t: Tensors, path: Path) -> tuple[str, Any]:
    if arch == "lora":
        for key, what in (("use_gating", "gated LoRA"), ("use_dora", "DoRA"), ("vera_d", "VeRA"),
                          ("vera_b", "VeRA")):
            if config.get(key):
                raise UnsupportedAdapterError(f"{path}: {what} adapters are not supported.\n  fix: merge it with the "
                                              "`adapters` library (merge_adapter) instead.", path=path)
        if config.get("composition_mode", "add") != "add":
            raise UnsupportedAdapterError(
                f"{path}: LoRA with composition_mode={config.get('composition_mode')!r} ((IA)^3 in the `adapters` "
                "library) is not supported.\n  fix: use a PEFT IA3 adapter.", path=path)
        return "lora", LoraSpec(r=check_number("r", config.get("r"), integer=True, minimum=1),
                                alpha=check_number("alpha", config.get("alpha", 8)))
    if arch == "prefix_tuning":
        length = int(check_number("prefix_length", config.get("prefix_length"), integer=True, minimum=1))
        flat = bool(config.get("flat"))
        if flat:
            names = [n for n in t if n.endswith(".control_trans")]
            widths = {t.numel(n) // length for n in names}
        else:
            names = [n for n in t if n.endswith(".control_trans.2.weight")]
            widths = {t.shape(n)[0] for n in names}
        if len(names) != 1:
            raise UnsupportedAdapterError(
                f"{path}: prefix tuning with {len(names)} prefix groups (encoder-decoder cross prefixes) is not "
                "supported; adapterhub reads one self-attention prefix.\n  fix: use the `adapters` library itself "
                "for this adapter.", path=path)
        return "prefix", PrefixSpec(num_virtual_tokens=length, width=widths.pop(),
                                    layout="adapters_flat" if flat else "adapters_mlp")
    if arch in ("seq_bn", "double_seq_bn", "par_bn", "bottleneck"):
        if config.get("phm_layer") or config.get("inv_adapter") or config.get("use_gating"):
            raise UnsupportedAdapterError(
                f"{path}: bottleneck adapters with PHM layers, invertible adapters or gating are not supported.\n"
                "  fix: use the `adapters` library itself for this adapter.", path=path)
        return "bottleneck", BottleneckSpec(architecture=arch, config=dict(config),
                                            hidden_size=doc.get("hidden_size"))
    raise UnsupportedAdapterError(
        f"{path}: `adapters` library architecture {arch!r} is not supported; adapterhub reads bottleneck "
        "adapters (seq_bn, double_seq_bn, par_bn), lora and prefix_tuning.\n  fix: use the `adapters` library "
        "itself for this adapter.", path=path)


# --- prefix conversion -----------------------------------------------------------------------------


def prefix_values(adapter: Adapter) -> Any:
    """The prefix key/values of a prefix-tuning adapter as a (virtual tokens x width) float tensor.

    The ``adapters_mlp`` layout is evaluated in float32 exactly as the library's forward does
    (``control_trans(wte)``, tanh or the configured activation); other layouts are reshaped only.
    """
    import torch

    spec = adapter.spec
    t = adapter.tensors
    if spec.layout == "peft":
        return t["prompt_embeddings"]
    names = {n.rsplit("prefix_tunings.", 1)[-1]: n for n in t}
    if spec.layout == "adapters_flat":
        (flat,) = (t[n] for k, n in names.items() if k.endswith("control_trans"))
        return flat.reshape(spec.num_virtual_tokens, spec.width)
    get = {k.split(".", 1)[1]: n for k, n in names.items()}
    emb = t[get["wte.weight"]].float()
    act_name = str((adapter.extra.get("adapters") or {}).get("config", {}).get("non_linearity", "tanh")).lower()
    acts = {"tanh": torch.tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
            "swish": torch.nn.functional.silu, "silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid}
    if act_name not in acts:
        raise UnsupportedAdapterError(f"prefix MLP activation {act_name!r} is not supported.")
    linear = torch.nn.functional.linear
    h = linear(emb, t[get["control_trans.0.weight"]].float(), t[get["control_trans.0.bias"]].float())
    w2 = t[get["control_trans.2.weight"]]
    return linear(acts[act_name](h), w2.float(), t[get["control_trans.2.bias"]].float()).to(w2.dtype)


def prefix_to_peft(adapter: Adapter, *, num_layers: int, num_kv_heads: int) -> Adapter:
    """An ``adapters``-library prefix as a PEFT prefix (``prompt_embeddings``), given the base's
    layer and key/value-head counts. Both libraries order each token's values as
    (layer, key/value, head, head_dim), so the values carry over unchanged."""
    spec = adapter.spec
    if spec.width % (2 * num_layers * num_kv_heads):
        raise UnsupportedAdapterError(
            f"a prefix of width {spec.width} does not split into {num_layers} layers x 2 x {num_kv_heads} heads; "
            "it was made for another base.")
    token_dim = spec.width // (2 * num_layers)
    values = prefix_values(adapter).contiguous()
    new_spec = PrefixSpec(num_virtual_tokens=spec.num_virtual_tokens, width=spec.width, num_layers=num_layers,
                          num_kv_heads=num_kv_heads, token_dim=token_dim, layout="peft")
    return adapter.replace(spec=new_spec, tensors=Tensors({"prompt_embeddings": values}), extra={})


# --- writing -----------------------------------------------------------------------------------


def document_for(adapter: Adapter, *, name: str | None = None, model_class: str | None = None,
                 model_type: str | None = None, hidden_size: int | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` document for an adapter (its original one where it came from the library)."""
    doc = dict(adapter.extra.get("adapters") or {})
    name = name or adapter.name or doc.get("name") or "adapter"
    if adapter.kind == "ia3":
        raise UnsupportedAdapterError("IA3 adapters are written in PEFT format only." + KEEP_PEFT)
    if not doc:
        doc = {"config": _config_for(adapter), "version": LIBRARY_VERSION}
    doc["name"] = name
    doc["model_name"] = adapter.base.name_or_path
    if model_class is None and adapter.base.architectures:
        model_class = adapter.base.architectures[0]
    if model_type is None and adapter.base.model_type:
        model_type = adapter.base.model_type
    for key, value in (("model_class", model_class), ("model_type", model_type), ("hidden_size", hidden_size)):
        if value is not None:
            doc[key] = value
        doc.setdefault(key, None)
    return doc


def _config_for(adapter: Adapter) -> dict[str, Any]:
    if adapter.kind == "bottleneck":
        return dict(adapter.spec.config)
    if adapter.kind == "prefix":
        raise UnsupportedAdapterError(
            "a PEFT prefix becomes an `adapters` library prefix with prefix_from_peft(); write that instead.")
    spec = adapter.spec
    mods = adapter.modules()
    ranks = {adapter.lora_rank(m) for m in mods}
    scales = {spec.scale(m) for m in mods}
    if len(ranks) != 1 or len(scales) != 1:
        raise UnsupportedAdapterError(
            "the `adapters` library gives every LoRA module one r and alpha; this adapter has ranks "
            f"{sorted(ranks)} and scales {sorted(scales)} (rank_pattern/alpha_pattern)." + KEEP_PEFT)
    if spec.use_dora or spec.lora_bias or adapter.carried() or spec.fan_in_fan_out:
        raise UnsupportedAdapterError(
            "DoRA, LoRA bias, fan_in_fan_out and modules_to_save have no `adapters` library LoRA equivalent."
            + KEEP_PEFT)
    if any("lora_embedding_A" in adapter.module_tensors(m) for m in mods):
        raise UnsupportedAdapterError("embedding LoRA has no `adapters` library equivalent." + KEEP_PEFT)
    (r,) = ranks
    (scale,) = scales
    attn, intermediate, output = set(), False, False
    for m in mods:
        leaf = m.rsplit(".", 1)[-1]
        if leaf in _ATTN_MATRIX and _ATTN_MATRIX[leaf] != "qkv":
            attn.add(_ATTN_MATRIX[leaf])
        elif _INTERMEDIATE.search(m):
            intermediate = True
        elif _OUTPUT.search(m):
            output = True
        else:
            raise UnsupportedAdapterError(
                f"module '{m}' is not one the `adapters` library places LoRA on (attention q/k/v, the feed-forward "
                "up and down projections)." + KEEP_PEFT)
    # the library's scale is alpha / r: pick alpha so that it equals this adapter's (rsLoRA included)
    alpha = spec.alpha if not spec.use_rslora else scale * r
    return {
        "architecture": "lora", "r": r, "alpha": alpha, "attn_matrices": sorted(attn, key="qkv".index),
        "selfattn_lora": bool(attn), "intermediate_lora": intermediate, "output_lora": output,
        "composition_mode": "add", "dropout": 0.0, "init_weights": "lora", "use_gating": False,
        "use_dora": False, "leave_out": [], "dtype": None, "init_weights_seed": None, "vera_b": None, "vera_d": None,
    }


def prefix_from_peft(adapter: Adapter, *, key_root: str = "") -> Adapter:
    """A PEFT prefix as an ``adapters``-library flat prefix (the same values, one flat tensor).

    ``key_root`` is the model attribute path in front of ``prefix_tuning`` (``"model."`` for
    ``*ForCausalLM`` models, ``""`` for bare encoders such as ``BertModel``).
    """
    spec = adapter.spec
    values = adapter.tensors["prompt_embeddings"].reshape(-1).contiguous()
    doc = {"config": {"architecture": "prefix_tuning", "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0,
                      "encoder_prefix": True, "flat": True, "init_weights_seed": None, "leave_out": [],
                      "non_linearity": "tanh", "prefix_length": spec.num_virtual_tokens, "shared_gating": True,
                      "use_gating": False},
           "version": LIBRARY_VERSION}
    new_spec = PrefixSpec(num_virtual_tokens=spec.num_virtual_tokens, width=spec.width, num_layers=spec.num_layers,
                          num_kv_heads=spec.num_kv_heads, token_dim=spec.token_dim, layout="adapters_flat")
    key = f"{key_root}prefix_tuning.prefix_tunings.self_prefix.control_trans"
    return adapter.replace(spec=new_spec, tensors=Tensors({key: values}), extra={"adapters": doc})


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, name: str | None = None,
          model_class: str | None = None, model_type: str | None = None, hidden_size: int | None = None,
          prefix_key_root: str = "") -> Path:
    """Write ``adapter`` as an ``adapters``-library directory that ``model.load_adapter(path)`` loads.

    ``model_class``/``model_type``/``hidden_size`` fill the document's model fields when the
    adapter did not come from the library (pass them from the base's config). ``prefix_key_root``
    is the model attribute path in front of ``prefix_tuning`` for a converted PEFT prefix
    (``"model."`` for ``*ForCausalLM`` models, ``""`` for bare encoders).
    """
    path = Path(path)
    if adapter.kind == "prefix" and adapter.spec.layout == "peft":
        adapter = prefix_from_peft(adapter, key_root=prefix_key_root)
    doc = document_for(adapter, name=name, model_class=model_class, model_type=model_type, hidden_size=hidden_size)
    lib_name = doc["name"]
    tensors = {_to_library(n, lib_name, adapter.kind): adapter.tensors[n] for n in adapter.tensors}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(dump_json(doc), encoding="utf-8")
        save_tensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt"})
    return path
