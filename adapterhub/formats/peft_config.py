"""What every field of a PEFT ``adapter_config.json`` means to adapterhub: honoured exactly, inert for
inference, or refused with an error naming it. docs/peft-config-fields.md is this module in prose.

The rule: an adapter adapterhub reads computes exactly what PEFT computes when it loads the same
directory (``PeftModel.from_pretrained``), or it is refused. In particular the config decides which
modules are adapted, as in PEFT: weights of modules the config does not target (other layers than
``layers_to_transform``, ``exclude_modules``, a ``target_modules`` that leaves them out) are not
applied; PEFT ignores them when it loads the state dict, and so do we (:attr:`Interpretation.ignored`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapterhub.adapter import IA3Spec, LoraSpec, PrefixSpec, check_flag, check_number, check_regex
from adapterhub.errors import InvalidValueError, UnsupportedAdapterError

#: the PEFT release whose config fields these tables cover
PEFT_VERSION = "0.21"

#: fields every PEFT config has (``PeftConfig``): identity and bookkeeping
COMMON_FIELDS = {
    "peft_type": "selects the adapter kind (LORA, IA3, PREFIX_TUNING; others are refused)",
    "task_type": "inert, except that 'all-linear' skips a SEQ_CLS model's classifier head as PEFT does",
    "auto_mapping": "recorded: its base_model_class is the architecture the adapter was made with",
    "peft_version": "inert",
    "base_model_name_or_path": "recorded; a different base name is a check warning (an error with --strict-identity)",
    "revision": "recorded",
    "inference_mode": "inert (PEFT sets it when loading)",
}

LORA_FIELDS = {
    **COMMON_FIELDS,
    "r": "honoured: the rank; an integer >= 1 equal to the tensors' rank",
    "lora_alpha": "honoured: scale alpha/r (alpha/sqrt(r) with use_rslora); a finite number",
    "target_modules": "honoured: which modules are adapted (list, regex, 'all-linear'); null and no match refused",
    "exclude_modules": "honoured: modules never adapted (list or regex)",
    "layers_to_transform": "honoured: only these layer indices are adapted (PEFT's layer-index rule)",
    "layers_pattern": "honoured: the layer container name(s) for layers_to_transform",
    "rank_pattern": "honoured: per-module ranks, matched as PEFT matches them",
    "alpha_pattern": "honoured: per-module alphas, matched as PEFT matches them",
    "use_rslora": "honoured",
    "fan_in_fan_out": "honoured",
    "use_dora": "honoured (magnitude vectors required)",
    "lora_bias": "honoured: lora_B.bias folds into the base bias",
    "modules_to_save": "honoured: the saved copies replace the base's; modules inside them are not adapted",
    "bias": "honoured: saved biases ('all', 'lora_only') replace the base's, as PEFT's load_state_dict does",
    "init_lora_weights": "inert for True/False/gaussian/eva/orthogonal/lora_ga/mica (the saved weights replace "
                         "the initial ones); pissa*, olora, corda, loftq refused (PEFT rewrites the base weights)",
    "lora_dropout": "inert (training only); a number in [0, 1]",
    "megatron_config": "refused when set",
    "megatron_core": "inert (used only with megatron_config)",
    "trainable_token_indices": "refused when set",
    "loftq_config": "inert (PEFT ignores it unless init_lora_weights='loftq', which is refused)",
    "eva_config": "inert (initialisation only)",
    "corda_config": "inert (initialisation only; init_lora_weights='corda' is refused)",
    "lora_ga_config": "inert (initialisation only)",
    "velora_config": "inert: VeLoRA changes the backward pass only; its saved lora_velora_embed buffers are ignored",
    "monteclora_config": "inert: MonteCLoRA samples only in training; its saved sampler tensors are ignored",
    "alora_invocation_tokens": "refused when set (activated LoRA applies per token, it cannot be folded)",
    "use_qalora": "refused when true (QA-LoRA pools the input)",
    "qalora_group_size": "inert (used only with use_qalora)",
    "layer_replication": "refused when set",
    "runtime_config": "inert",
    "target_parameters": "refused when set (LoRA on raw parameters)",
    "use_bdlora": "refused when set (block-diagonal LoRA)",
    "arrow_config": "refused when set (Arrow routing)",
    "kasa_config": "refused when set (KaSA truncates the base weights)",
    "ensure_weight_tying": "refused when true (tied adapters on tied layers)",
}

IA3_FIELDS = {
    **COMMON_FIELDS,
    "target_modules": "honoured: which modules are scaled (list, regex, 'all-linear'); null and no match refused",
    "exclude_modules": "honoured",
    "feedforward_modules": "honoured: these scale their input, matched as PEFT matches them (a suffix, or a regex)",
    "fan_in_fan_out": "honoured",
    "modules_to_save": "honoured, as for LoRA",
    "init_ia3_weights": "inert (the saved vectors replace the initial ones)",
}

PREFIX_FIELDS = {
    **COMMON_FIELDS,
    "num_virtual_tokens": "honoured: prefix length",
    "token_dim": "honoured: kv-heads x head_dim per layer (checked against the base)",
    "num_attention_heads": "honoured: key/value heads (checked against the base)",
    "num_layers": "honoured (checked against the base)",
    "num_transformer_submodules": "honoured: 1 (decoder-only); 2 (encoder-decoder) is refused",
    "modules_to_save": "refused by check and blend when the weights hold saved modules (a classification head)",
    "init_weights": "inert",
    "encoder_hidden_size": "inert (the saved prompt_embeddings are the projected values)",
    "prefix_projection": "honoured: PEFT saves the projected values, which are what is applied",
}

FIELDS = {"LORA": LORA_FIELDS, "IA3": IA3_FIELDS, "PREFIX_TUNING": PREFIX_FIELDS}

#: LoRA fields refused when set (truthy), with what they are
_REFUSED_LORA = {
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA input pooling",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA (it truncates the base weights)",
    "megatron_config": "Megatron parallel layers",
    "ensure_weight_tying": "weight-tied adapters",
}
#: init_lora_weights values after which PEFT changes the base weights when it loads the adapter
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_INERT_INITS = (True, False, "gaussian", "eva", "orthogonal", "lora_ga", "mica")
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: output heads PEFT's 'all-linear' leaves out (``get_output_embeddings()``; SEQ_CLS heads)
_OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
_SEQ_CLS_HEADS = ("classifier", "score")
#: tensors of LoRA variants that matter in training only (PEFT ignores them in eval and when merging)
_TRAINING_STATE = re.compile(r"\.(lora_velora_embed|lora_monteclora_sampler\.[^.]+)$")


@dataclass
class Interpretation:
    """A PEFT config read against the adapter's tensor names."""

    spec: LoraSpec | IA3Spec | PrefixSpec
    #: tensor name -> why PEFT does not apply it (the config does not target its module, training-only state)
    ignored: dict[str, str] = field(default_factory=dict)


def _present(value: Any) -> bool:
    return value not in (None, False, [], {}, "", 0) and not (isinstance(value, float) and value == 0.0)


def _string_list(where: str, value: Any, *, allow_str: bool = True) -> tuple[str, ...] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            raise InvalidValueError(f"{where} must be a list of module names, not the string {value!r}.", where=where)
        return check_regex(where, value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidValueError(f"{where} must be a list of module names or a regular expression, not {value!r}.\n"
                            f"  fix: correct {where} in the adapter's config.", where=where)


def _unknown(config: Mapping[str, Any], known: Mapping[str, str], peft_type: str) -> None:
    """PEFT drops keys its config class does not have (with a warning). A newer PEFT's field that is set may
    change what the adapter computes, so a set unknown field is refused; an unset one (null, false, empty) is
    ignored as PEFT ignores it."""
    for key in sorted(set(config) - set(known)):
        if _present(config[key]):
            raise UnsupportedAdapterError(
                f"config field {key}={config[key]!r} is not a {peft_type} field adapterhub knows (it follows PEFT "
                f"{PEFT_VERSION}), so what it changes cannot be reproduced.\n  fix: if the field has no "
                "effect on inference, remove it from adapter_config.json; otherwise merge the adapter with the PEFT "
                "version that wrote it.")


# --- PEFT's module matching (peft.tuners.tuners_utils.check_target_module_exists), exactly -----------------


def targets(config: Mapping[str, Any], key: str) -> bool:
    """Whether PEFT adapts the module at path ``key`` under ``config`` (``target_modules`` already resolved:
    a list or a regular expression, not 'all-linear')."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    to_save = config.get("modules_to_save")
    if to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in to_save):
        return False
    target = config.get("target_modules")
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:  # an exact path is adapted whatever layers_to_transform says (as in PEFT)
        return True
    if not any(key.endswith(f".{t}") for t in target):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _all_linear(module: str, linear: bool, task_type: Any) -> bool:
    """PEFT's 'all-linear': every nn.Linear / Conv1D except the output embedding (and a SEQ_CLS head)."""
    if not linear or module in _OUTPUT_EMBEDDINGS:
        return False
    return not (task_type == "SEQ_CLS" and module in _SEQ_CLS_HEADS)


def _layer_options(config: Mapping[str, Any]) -> None:
    indexes, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if indexes is not None:
        items = [indexes] if isinstance(indexes, int) and not isinstance(indexes, bool) else indexes
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise InvalidValueError(f"layers_to_transform must be a layer index or a list of them, not {indexes!r}.",
                                    where="layers_to_transform")
    if pattern is not None:
        for p in [pattern] if isinstance(pattern, str) else _string_list("layers_pattern", pattern):
            check_regex("layers_pattern", p)
    if isinstance(config.get("target_modules"), str) and (indexes is not None or pattern is not None):
        raise InvalidValueError(
            "layers_to_transform/layers_pattern cannot be used with a regular-expression target_modules (PEFT "
            "refuses this config).\n  fix: list the target modules, or fold the layers into the expression.",
            where="layers_to_transform")
    if pattern and indexes is None:
        raise InvalidValueError("layers_pattern is set without layers_to_transform (PEFT refuses this config).",
                                where="layers_pattern")


def _select(config: Mapping[str, Any], modules: Mapping[str, bool]) -> set[str]:
    """The modules PEFT adapts among those the weights hold (``modules``: path -> is a linear layer)."""
    target = config.get("target_modules")
    if target is None:
        raise InvalidValueError(
            "target_modules is null: PEFT would pick default targets for the architecture it is loaded on, which "
            "adapterhub cannot know from the adapter.\n  fix: set target_modules in adapter_config.json to the "
            "modules the adapter was trained on.", where="target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        task = config.get("task_type")
        applied = {m for m, linear in modules.items() if _all_linear(m, linear, task) and _not_excluded(config, m)}
    else:
        applied = {m for m in modules if targets(config, m)}
        containers = sorted({p for m in modules for p in _ancestors(m) if targets(config, p)})
        if containers:
            raise InvalidValueError(
                f"target_modules={_show(target)} also match {containers[0]}, a module that contains others (PEFT "
                "can only adapt layers such as Linear, Embedding and Conv): PEFT refuses to load this adapter "
                "('Target module ... is not supported').\n  fix: narrow target_modules to the modules the adapter was "
                "trained on.", where="target_modules")
    if modules and not applied:
        extra = "".join(f", {k}={config[k]!r}" for k in ("exclude_modules", "layers_to_transform", "layers_pattern")
                        if config.get(k) is not None)
        sample = ", ".join(sorted(modules)[:2])
        raise InvalidValueError(
            f"target_modules={_show(target)}{extra} match none of the {len(modules)} module(s) the weights hold "
            f"({sample}, ...): PEFT refuses to load this adapter ('Target modules ... not found').\n"
            "  fix: set target_modules to the modules the adapter was trained on.", where="target_modules")
    return applied


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _saved_copies(config: Mapping[str, Any], modules: Mapping[str, bool], tensors: Mapping[str, Any]) -> None:
    """A module of the weights that ``modules_to_save`` covers is wrapped by PEFT, which then needs its saved copy."""
    to_save = config.get("modules_to_save") or ()
    for m in sorted(modules):
        if any(re.match(rf"(^|.*\.){s}$", m) for s in to_save) and f"{m}.weight" not in tensors:
            raise InvalidValueError(
                f"modules_to_save={list(to_save)!r} covers module {m}, whose LoRA weights PEFT then ignores, but the "
                f"weights hold no saved copy of it ({m}.weight): PEFT fails to load this adapter.\n  fix: remove the "
                "entry from modules_to_save, or save the adapter again with PEFT.", where="modules_to_save")


def _not_excluded(config: Mapping[str, Any], key: str) -> bool:
    """The exclusion part of PEFT's matching alone (exclude_modules, modules_to_save)."""
    return targets({**config, "target_modules": [key]}, key)


def _show(value: Any) -> str:
    return repr(sorted(value)) if isinstance(value, list | tuple) else repr(value)


def _why(config: Mapping[str, Any]) -> str:
    parts = [f"target_modules={_show(config.get('target_modules'))}"]
    parts += [f"{k}={config[k]!r}" for k in ("exclude_modules", "layers_to_transform", "layers_pattern",
                                             "modules_to_save") if config.get(k)]
    return "the config does not target this module (" + ", ".join(parts) + "); PEFT ignores its weights"


# --- per kind ---------------------------------------------------------------------------------------------


def interpret(peft_type: str, config: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]],
              module_of: Any) -> Interpretation:
    """Validate ``config`` field by field and decide which of the weights PEFT applies.

    Args:
        tensors: canonical tensor name -> shape.
        module_of: canonical tensor name -> (module path, role) for adapter parameters, None for others.

    Raises:
        InvalidValueError / NonFiniteError: a field holds an unusable value (named in the message).
        UnsupportedAdapterError: a field asks for something adapterhub cannot reproduce exactly.
    """
    _unknown(config, FIELDS[peft_type], peft_type)
    task = config.get("task_type")
    if task not in TASK_TYPES:
        raise InvalidValueError(f"task_type {task!r} is not a PEFT task type ({', '.join(map(str, TASK_TYPES[1:]))})"
                                "; PEFT refuses this config.", where="task_type")
    for name in ("base_model_name_or_path", "revision"):
        if config.get(name) is not None and not isinstance(config[name], str):
            raise InvalidValueError(f"{name} must be a string, not {config[name]!r}.", where=name)
    if peft_type == "PREFIX_TUNING":
        return Interpretation(_prefix(config))
    ignored: dict[str, str] = {}
    modules: dict[str, bool] = {}
    for name, shape in tensors.items():
        s = module_of(name)
        if s is None:
            if _TRAINING_STATE.search(name):
                ignored[name] = "training-only state of a LoRA variant (VeLoRA, MonteCLoRA); PEFT does not use it " \
                                "in inference or merging"
            continue
        module, role = s
        if role in ("lora_A", "ia3_l"):
            modules[module] = len(shape) == 2
        elif role == "lora_embedding_A":
            modules[module] = False
        else:
            modules.setdefault(module, True)
    target = _string_list("target_modules", config.get("target_modules"))
    _string_list("exclude_modules", config.get("exclude_modules"))
    for entry in _string_list("modules_to_save", config.get("modules_to_save"), allow_str=False) or ():
        check_regex("modules_to_save entry", entry)  # PEFT matches them inside a regular expression
    if peft_type == "LORA":
        spec = _lora(config, target)
    else:
        spec = _ia3(config, target)
    _layer_options(config)
    applied = _select(config, modules)
    _saved_copies(config, modules, tensors)
    why = _why(config)
    for name in tensors:
        s = module_of(name)
        owner = s[0] if s else next((m for m in modules if name.startswith(f"{m}.base_layer.")), None)
        if owner is not None and owner not in applied:
            ignored[name] = why
    if isinstance(spec, LoraSpec):  # a variant's tensors the config switches off: PEFT has no parameter for them
        for name in tensors:
            role = (module_of(name) or ("", ""))[1]
            if name not in ignored and (flag := _VARIANT_TENSORS.get(role)) and not getattr(spec, flag):
                ignored[name] = f"{flag} is false: PEFT creates no {role} and ignores this weight"
    return Interpretation(spec, ignored)


#: LoRA tensor roles that exist only when a config flag is on (PEFT drops them as unexpected keys otherwise)
_VARIANT_TENSORS = {"lora_magnitude_vector": "use_dora", "lora_B.bias": "lora_bias"}


def _lora(c: Mapping[str, Any], target: tuple[str, ...] | str | None) -> LoraSpec:
    for key, what in _REFUSED_LORA.items():
        if _present(c.get(key)):
            raise UnsupportedAdapterError(
                f"this LoRA uses {what} ({key}={c[key]!r}), which adapterhub cannot reproduce exactly.\n"
                "  fix: merge it with PEFT instead.")
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r}: when PEFT loads this adapter it rewrites the base weights ({init} "
            "initialisation subtracts the initial adapter from them), which adapterhub does not reproduce.\n"
            "  fix: save it with PEFT as a plain LoRA: model.save_pretrained(out, "
            "path_initial_model_for_weight_conversion=<the initial adapter>), then use that.")
    if init not in _INERT_INITS:
        raise InvalidValueError(f"init_lora_weights={init!r} is not a value PEFT accepts.", where="init_lora_weights")
    dropout = check_number("lora_dropout", c.get("lora_dropout", 0.0))
    if not 0.0 <= dropout <= 1.0:
        raise InvalidValueError(f"lora_dropout must be in [0, 1], not {dropout!r}.", where="lora_dropout")
    if c.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InvalidValueError(f"bias must be 'none', 'all' or 'lora_only', not {c.get('bias')!r}.", where="bias")
    flags = {k: check_flag(k, c.get(k, False)) for k in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias")}
    if flags["lora_bias"] and flags["use_dora"]:
        raise UnsupportedAdapterError("lora_bias=true with use_dora=true: PEFT refuses this combination.")
    if flags["lora_bias"] and init not in (True, False):
        raise UnsupportedAdapterError(f"lora_bias=true with init_lora_weights={init!r}: PEFT refuses this combination.")
    r = check_number("r", c["r"] if "r" in c else 8, integer=True, minimum=1)
    alpha = check_number("lora_alpha", c.get("lora_alpha", 8))
    for name in ("rank_pattern", "alpha_pattern"):
        if c.get(name) is not None and not isinstance(c.get(name), dict):
            raise InvalidValueError(f"{name} must be an object of module pattern -> value, not {c[name]!r}.",
                                    where=name)
    return LoraSpec(
        r=int(r), alpha=alpha, use_rslora=flags["use_rslora"],
        rank_pattern=dict(c.get("rank_pattern") or {}), alpha_pattern=dict(c.get("alpha_pattern") or {}),
        target_modules=target, fan_in_fan_out=flags["fan_in_fan_out"], use_dora=flags["use_dora"],
        lora_bias=flags["lora_bias"], modules_to_save=tuple(c.get("modules_to_save") or ()),
    )


def _ia3(c: Mapping[str, Any], target: tuple[str, ...] | str | None) -> IA3Spec:
    ff = _string_list("feedforward_modules", c.get("feedforward_modules"))
    if isinstance(ff, tuple) and isinstance(target, tuple) and not set(ff) <= set(target):
        raise InvalidValueError(
            f"feedforward_modules {sorted(set(ff) - set(target))} are not in target_modules (PEFT refuses this "
            "config: feedforward_modules must be a subset of target_modules).", where="feedforward_modules")
    check_flag("init_ia3_weights", c.get("init_ia3_weights", True))
    return IA3Spec(target_modules=target, feedforward_modules=ff,
                   fan_in_fan_out=check_flag("fan_in_fan_out", c.get("fan_in_fan_out", False)),
                   modules_to_save=tuple(c.get("modules_to_save") or ()))


def _prefix(c: Mapping[str, Any]) -> PrefixSpec:
    values = {k: check_number(k, c.get(k), integer=True, minimum=1)
              for k in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")}
    sub = check_number("num_transformer_submodules", c.get("num_transformer_submodules") or 1, integer=True,
                       minimum=1)
    if sub != 1:
        raise UnsupportedAdapterError(
            f"num_transformer_submodules={sub}: prefixes for encoder-decoder models are not supported; adapterhub "
            "reads decoder-only and encoder-only prefixes.")
    check_flag("prefix_projection", c.get("prefix_projection", False))
    return PrefixSpec(num_virtual_tokens=int(values["num_virtual_tokens"]),
                      width=int(values["num_layers"]) * 2 * int(values["token_dim"]),
                      num_layers=int(values["num_layers"]), num_kv_heads=int(values["num_attention_heads"]),
                      token_dim=int(values["token_dim"]), num_transformer_submodules=int(sub), layout="peft")


def architecture(config: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...] | None]:
    """(model_type, architectures) PEFT recorded: ``auto_mapping`` names the base model class and its module
    (``transformers.models.llama.modeling_llama``) when the adapter was saved without a task type."""
    mapping = config.get("auto_mapping")
    if not isinstance(mapping, dict):
        return None, None
    cls, lib = mapping.get("base_model_class"), mapping.get("parent_library")
    model_type = None
    if isinstance(lib, str) and lib.startswith("transformers.models.") and ".modeling_" in lib:
        model_type = lib.rsplit(".modeling_", 1)[1]
    return model_type, ((cls,) if isinstance(cls, str) and cls else None)


__all__ = ["FIELDS", "IA3_FIELDS", "LORA_FIELDS", "PREFIX_FIELDS", "Interpretation", "architecture", "interpret",
           "targets"]
