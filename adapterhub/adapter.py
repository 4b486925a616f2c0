"""The Adapter value: kind, typed spec, base-model identity and lazily loaded tensors.

Tensor names are canonical and format-independent: the module path as the adapter's model saw it
(e.g. ``model.layers.0.self_attn.q_proj``) followed by the parameter role:

=========  =====================================================================================
kind       parameter names
=========  =====================================================================================
lora       ``lora_A`` (r x in), ``lora_B`` (out x r), ``lora_B.bias`` (out), ``lora_magnitude_vector``
           (DoRA, out), ``lora_embedding_A`` (r x vocab), ``lora_embedding_B`` (dim x r)
ia3        ``ia3_l``: (out x 1) scales a module's output, (1 x in) a feed-forward module's input
bottleneck names as the ``adapters`` library writes them with the adapter's own name removed
prefix     ``prompt_embeddings``: (virtual tokens x layers*2*token_dim), PEFT's layout
=========  =====================================================================================

Any other tensor (a ``modules_to_save`` copy, a saved embedding layer) is *carried*: kept verbatim
and written back, never interpreted.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adapterhub.errors import InvalidValueError, NonFiniteError
from adapterhub.tensorfile import TensorInfo, load_tensor

if TYPE_CHECKING:
    import torch

Kind = Literal["lora", "ia3", "bottleneck", "prefix"]
KINDS: tuple[str, ...] = ("lora", "ia3", "bottleneck", "prefix")

LORA_PARAMS = ("lora_A", "lora_B", "lora_B.bias", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
IA3_PARAMS = ("ia3_l",)
_FLOAT_MAX = int(sys.float_info.max)


def check_number(where: str, value: Any, *, integer: bool = False, minimum: float | None = None) -> float | int:
    """``value`` if it is a usable number for ``where``, else a clear error.

    Booleans are refused (``True`` would silently read as 1), as are text, NaN and infinities.

    Raises:
        NonFiniteError: NaN or infinite.
        InvalidValueError: not a number, not an integer where one is needed, or below ``minimum``.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValueError(f"{where} must be {kind}, not {value!r} ({type(value).__name__}).\n"
                                f"  fix: write {where} as {kind} in the adapter's config.", where=where)
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteError(f"{where} is {value!r}; it must be a finite number.\n  fix: write the value the adapter "
                             "was trained with in its config.", where=where, counts={where: 1})
    if isinstance(value, int) and abs(value) > _FLOAT_MAX:  # 10**400: every use as a float would overflow
        raise InvalidValueError(f"{where} is a {len(str(abs(value)))}-digit number, too large to compute with.\n"
                                "  fix: write the value the adapter was trained with in its config.", where=where)
    if integer and not isinstance(value, int):  # 4.0 too: PEFT fails on a float rank
        raise InvalidValueError(f"{where} must be an integer, not {value!r}.\n  fix: write {where} as an "
                                "integer in the adapter's config.", where=where)
    if minimum is not None and value < minimum:
        raise InvalidValueError(f"{where} must be at least {minimum:g}, not {value!r}.\n  fix: write the value the "
                                "adapter was trained with in its config.", where=where)
    return value


def check_flag(where: str, value: Any) -> bool:
    """``value`` if it is a boolean, else a clear error (``"false"`` would read as true)."""
    if not isinstance(value, bool):
        raise InvalidValueError(f"{where} must be true or false, not {value!r} ({type(value).__name__}).\n"
                                f"  fix: write {where} as a JSON boolean in the adapter's config.", where=where)
    return value


def check_regex(where: str, pattern: Any) -> str:
    """``pattern`` if it is a string that compiles as a regular expression, else a clear error."""
    if not isinstance(pattern, str):
        raise InvalidValueError(f"{where} must be a string, not {pattern!r}.", where=where)
    try:
        re.compile(pattern)
    except re.error as e:
        raise InvalidValueError(f"{where} {pattern!r} is not a valid regular expression ({e}).\n  fix: correct it "
                                "in the adapter's config; PEFT would fail to load this adapter too.",
                                where=where) from e
    return pattern


def match_pattern_key(pattern_keys: Iterator[str] | list[str], module: str) -> str | None:
    """Return the first pattern key that matches ``module`` the way PEFT matches them, or None.

    A key matches when it equals the module path or a dot-separated suffix of it; keys are regular
    expressions (PEFT's ``re.match(rf"(.*\\.)?({key})$", module)``).
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class BaseModelRef:
    """What an adapter says about the base model it was trained on."""

    name_or_path: str | None = None
    revision: str | None = None
    fingerprint: str | None = None
    #: the base's ``config.json`` ``model_type`` (``"llama"``, ``"bert"``), when recorded
    model_type: str | None = None
    #: the model class(es) the adapter was made with (``config.json`` ``architectures``), when recorded
    architectures: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.architectures is not None and not isinstance(self.architectures, tuple):
            object.__setattr__(self, "architectures", tuple(self.architectures))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters; :meth:`scale` is the only place a module's scale is computed."""

    r: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_number("r", self.r, integer=True, minimum=1)
        check_number("lora_alpha", self.alpha)
        for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            check_flag(flag, getattr(self, flag))
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise InvalidValueError(f"{name} must be an object of module pattern -> value, not {pattern!r}.",
                                        where=name)
            for key, value in pattern.items():
                check_regex(f"{name} key", key)
                if name == "rank_pattern":
                    check_number(f"rank_pattern[{key!r}]", value, integer=True, minimum=1)
                else:
                    check_number(f"alpha_pattern[{key!r}]", value)

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module``: its ``rank_pattern`` entry, else ``r``."""
        key = match_pattern_key(list(self.rank_pattern), module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """The alpha PEFT gives ``module``: its ``alpha_pattern`` entry, else ``alpha``."""
        key = match_pattern_key(list(self.alpha_pattern), module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scale(self, module: str) -> float:
        """Effective scale of ``module``'s delta: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r = self.rank(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class IA3Spec:
    """IA3 hyper-parameters: which modules are scaled, and which scale their input."""

    target_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()

    def is_feedforward(self, module: str) -> bool:
        """Whether IA3 scales ``module``'s input, matched as PEFT matches ``feedforward_modules``: a string is a
        regular expression matching the whole path, a list entry matches any path that ends with it."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module.endswith(k) for k in ff)


@dataclass(frozen=True)
class BottleneckSpec:
    """A bottleneck adapter module (``adapters`` library ``seq_bn``/``double_seq_bn`` and kin).

    ``config`` is the library's full config dict (reduction factor, placement, layer norms,
    non-linearity, residual), kept verbatim because it defines the forward computation.
    """

    architecture: str
    config: dict[str, Any]
    hidden_size: int | None = None

    @property
    def reduction_factor(self) -> Any:
        return self.config.get("reduction_factor")


@dataclass(frozen=True)
class PrefixSpec:
    """Prefix tuning: per-layer key/value prefixes of ``num_virtual_tokens`` positions.

    ``width`` is the per-token size, ``num_layers * 2 * token_dim``, with ``token_dim`` =
    ``num_kv_heads * head_dim`` (GQA-aware, as PEFT counts it). The ``adapters`` library does not
    record layers and heads, so for its adapters these are None until read against a base.
    ``layout`` says how the tensors hold the prefix: ``"peft"`` (``prompt_embeddings``, tokens x
    width), ``"adapters_flat"`` (one flat ``control_trans`` of the same values) or
    ``"adapters_mlp"`` (an embedding and a two-layer MLP that compute them).
    """

    num_virtual_tokens: int
    width: int
    num_layers: int | None = None
    num_kv_heads: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int = 1
    layout: str = "peft"

    @property
    def head_dim(self) -> int | None:
        if self.token_dim is None or not self.num_kv_heads:
            return None
        return self.token_dim // self.num_kv_heads


Spec = LoraSpec | IA3Spec | BottleneckSpec | PrefixSpec
SPEC_TYPES: dict[str, type] = {"lora": LoraSpec, "ia3": IA3Spec, "bottleneck": BottleneckSpec, "prefix": PrefixSpec}


class Tensors(Mapping[str, "torch.Tensor"]):
    """A read-only name -> tensor mapping whose file-backed entries load only when indexed.

    ``dtype(name)`` and ``shape(name)`` answer from the safetensors header without loading.
    Indexing the same name twice reads the file twice: hold the tensor if you need it again.
    """

    def __init__(self, entries: Mapping[str, TensorInfo | torch.Tensor]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        return load_tensor(entry) if isinstance(entry, TensorInfo) else entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # Mapping's default would load the tensor

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._entries[name]
        return entry.shape if isinstance(entry, TensorInfo) else tuple(entry.shape)

    def dtype(self, name: str) -> str:
        """The safetensors dtype name (``F32``, ``BF16`` ...)."""
        entry = self._entries[name]
        if isinstance(entry, TensorInfo):
            return entry.dtype
        from adapterhub.dtypes import torch_to_st

        return torch_to_st(entry.dtype)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def nbytes(self, name: str) -> int:
        entry = self._entries[name]
        if isinstance(entry, TensorInfo):
            return entry.nbytes
        return entry.numel() * entry.element_size()

    def entry(self, name: str) -> TensorInfo | torch.Tensor:
        """The raw entry: a :class:`TensorInfo` for file-backed tensors, else the tensor."""
        return self._entries[name]

    def materialize(self) -> dict[str, torch.Tensor]:
        """Every tensor loaded, as a plain dict."""
        return {k: self[k] for k in self._entries}


def split_name(kind: str, name: str) -> tuple[str, str] | None:
    """Split a canonical tensor name into (module path, parameter role); None for carried tensors."""
    params = LORA_PARAMS if kind == "lora" else IA3_PARAMS if kind == "ia3" else ()
    for p in params:
        if name.endswith("." + p):
            return name[: -len(p) - 1], p
    return None


@dataclass(frozen=True)
class Adapter:
    """One adapter: what it is (kind, spec), what it was trained on (base), and its tensors.

    ``extra`` keeps format-specific configuration verbatim (``{"peft": {...}}`` or
    ``{"adapters": {...}}``) so that writing back to the same format reproduces it.
    """

    kind: Kind
    spec: Spec
    tensors: Tensors
    base: BaseModelRef = BaseModelRef()
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if not isinstance(self.spec, SPEC_TYPES[self.kind]):
            raise TypeError(f"a {self.kind} adapter needs a {SPEC_TYPES[self.kind].__name__}, "
                            f"not {type(self.spec).__name__}")

    # --- structure ---------------------------------------------------------------------------

    def modules(self) -> list[str]:
        """Module paths this adapter modifies (LoRA/IA3), in sorted order."""
        return sorted(self._by_module)

    @cached_property
    def _by_module(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for n in self.tensors:
            if s := split_name(self.kind, n):
                out.setdefault(s[0], {})[s[1]] = n
        return out

    def module_tensors(self, module: str) -> dict[str, str]:
        """Parameter role -> canonical tensor name for one module."""
        return dict(self._by_module.get(module, {}))

    def carried(self) -> list[str]:
        """Tensors kept verbatim (``modules_to_save`` copies, saved embedding layers)."""
        if self.kind not in ("lora", "ia3"):
            return []
        return sorted(n for n in self.tensors if split_name(self.kind, n) is None)

    def lora_rank(self, module: str) -> int:
        """The rank a LoRA module's tensors actually have."""
        names = self.module_tensors(module)
        if "lora_A" in names:
            return self.tensors.shape(names["lora_A"])[0]
        return self.tensors.shape(names["lora_embedding_A"])[0]

    @property
    def num_parameters(self) -> int:
        return sum(self.tensors.numel(n) for n in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(self.tensors.nbytes(n) for n in self.tensors)

    def replace(self, **changes: Any) -> Adapter:
        """A copy with some fields changed."""
        from dataclasses import replace

        return replace(self, **changes)


#: parameter role -> the numbers of dimensions its tensor may have (Conv2d LoRA factors are 4-d)
_NDIM = {"lora_A": (2, 4), "lora_B": (2, 4), "lora_embedding_A": (2,), "lora_embedding_B": (2,), "lora_B.bias": (1,),
         "lora_magnitude_vector": (1,), "ia3_l": (2,)}
#: the ``adapters`` library's prefix MLP: tensor -> its shape in terms of (tokens, input, hidden, width)
_PREFIX_MLP = {"control_trans.0.weight": ("hidden", "input"), "control_trans.2.weight": ("width", "hidden"),
               "wte.weight": ("tokens", "input"), "control_trans.0.bias": ("hidden",),
               "control_trans.2.bias": ("width",)}


def check_layout(adapter: Adapter) -> None:
    """Refuse tensors that cannot be what their role says (a 0-d ``lora_A``, factors of two ranks, a prefix
    MLP whose layers do not chain): a damaged or hand-made weights file, caught before anything indexes it.

    Raises:
        CorruptFileError: names the tensor, its shape and what it must be.
    """
    from adapterhub.errors import CorruptFileError

    t = adapter.tensors
    where = adapter.source if adapter.source is not None else "the adapter"

    def refuse(name: str, what: str) -> None:
        raise CorruptFileError(
            f"{where}: tensor '{name}' has shape {list(t.shape(name))}; {what}.\n  fix: the weights file is damaged "
            "or was edited by hand; re-export the adapter from its training run.", path=adapter.source)

    if adapter.kind in ("lora", "ia3"):
        for m in adapter.modules():
            roles = adapter.module_tensors(m)
            for role, name in roles.items():
                shape = t.shape(name)
                if len(shape) not in _NDIM[role] or 0 in shape:
                    dims = " or ".join(f"{n}-d" for n in _NDIM[role])
                    refuse(name, f"{role} must be a non-empty {dims} tensor")
                if role == "ia3_l" and 1 not in shape:
                    refuse(name, "an IA3 vector must be (out x 1) or (1 x in)")
            for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
                if (a in roles) != (b in roles):
                    have, miss = (a, b) if a in roles else (b, a)
                    raise CorruptFileError(f"{where}: module '{m}' has {have} but no {miss}.\n  fix: the weights file "
                                           "is incomplete; re-export the adapter.", path=adapter.source)
                if a in roles and b in roles and t.shape(roles[a])[0] != t.shape(roles[b])[1]:
                    refuse(roles[b], f"its rank (dimension 1) must equal that of {a} ({t.shape(roles[a])[0]})")
    elif adapter.kind == "prefix":
        spec = adapter.spec
        if spec.layout == "peft" and "prompt_embeddings" in t and len(t.shape("prompt_embeddings")) != 2:
            refuse("prompt_embeddings", "prefix values must be (virtual tokens x width)")
        if spec.layout == "adapters_flat":
            for name in (n for n in t if n.endswith(".control_trans")):
                if t.numel(name) == 0 or t.numel(name) % spec.num_virtual_tokens:
                    refuse(name, f"it must hold prefix_length ({spec.num_virtual_tokens}) x width values")
        if spec.layout == "adapters_mlp":
            sizes: dict[str, int] = {"tokens": spec.num_virtual_tokens}
            for role, dims in _PREFIX_MLP.items():
                name = next((n for n in t if n.endswith(f".{role}")), None)
                if name is None:
                    raise CorruptFileError(f"{where}: the prefix MLP has no {role} tensor.\n  fix: the weights file is "
                                           "incomplete; re-export the adapter.", path=adapter.source)
                shape = t.shape(name)
                fits = len(shape) == len(dims) and all(
                    sizes.setdefault(d, n) == n for d, n in zip(dims, shape, strict=False))
                if not fits:
                    want = " x ".join(f"{d} ({sizes[d]})" if d in sizes else d for d in dims)
                    refuse(name, f"the prefix MLP layers do not chain: it must be {want}")


def summarize(adapter: Adapter, *, scan_values: bool = False) -> dict[str, Any]:
    """A JSON-ready description: kind, base, targets, ranks, parameter count and sizes, weights the config does
    not apply (``ignored``: name -> why) and, with ``scan_values``, the tensors holding NaN/Inf (``non_finite``:
    name -> count; every weight is read once, without torch)."""
    from adapterhub.finite import scan_adapter

    t = adapter.tensors
    out: dict[str, Any] = {
        "kind": adapter.kind, "name": adapter.name, "source": str(adapter.source) if adapter.source else None,
        "base": {"name_or_path": adapter.base.name_or_path, "revision": adapter.base.revision,
                 "fingerprint": adapter.base.fingerprint, "model_type": adapter.base.model_type,
                 "architectures": list(adapter.base.architectures) if adapter.base.architectures else None},
        "num_tensors": len(t), "num_parameters": adapter.num_parameters, "tensor_bytes": adapter.nbytes,
        "dtypes": sorted({t.dtype(n) for n in t}),
        "non_finite": scan_adapter(adapter) if scan_values else {},
        "ignored": dict(adapter.extra.get("ignored") or {}),
    }
    if adapter.source is not None and Path(adapter.source).is_dir():
        out["size_on_disk"] = sum(p.stat().st_size for p in Path(adapter.source).iterdir() if p.is_file())
    spec = adapter.spec
    if adapter.kind in ("lora", "ia3"):
        mods = adapter.modules()
        leaves = sorted({m.rsplit(".", 1)[-1] for m in mods})
        out["targets"] = {"count": len(mods), "leaf_names": leaves, "modules": mods}
        out["carried"] = adapter.carried()
    if isinstance(spec, LoraSpec):
        ranks: dict[str, int] = {}
        for m in adapter.modules():
            ranks[m] = adapter.lora_rank(m)
        out["lora"] = {
            "r": spec.r, "alpha": spec.alpha, "use_rslora": spec.use_rslora, "use_dora": spec.use_dora,
            "rank_pattern": spec.rank_pattern, "alpha_pattern": spec.alpha_pattern,
            "fan_in_fan_out": spec.fan_in_fan_out,
            "ranks": sorted(set(ranks.values())),
            "scales": sorted({spec.scale(m) for m in ranks}),
        }
    elif isinstance(spec, IA3Spec):
        out["ia3"] = {"feedforward_modules": [m for m in adapter.modules() if spec.is_feedforward(m)]}
    elif isinstance(spec, BottleneckSpec):
        locations = sorted({n.split(".adapters.")[0] for n in t if ".adapters." in n})
        out["bottleneck"] = {"architecture": spec.architecture, "hidden_size": spec.hidden_size,
                             "reduction_factor": spec.reduction_factor,
                             "non_linearity": spec.config.get("non_linearity"), "locations": locations}
    elif isinstance(spec, PrefixSpec):
        out["prefix"] = {"num_virtual_tokens": spec.num_virtual_tokens, "width": spec.width,
                         "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads,
                         "head_dim": spec.head_dim, "layout": spec.layout}
    record = adapter.extra.get("extract")
    if isinstance(record, dict) and isinstance(record.get("modules"), dict):  # made by adapterhub extract
        errors = [v["error"] for v in record["modules"].values()
                  if isinstance(v, dict) and isinstance(v.get("error"), int | float)]
        out["extract"] = {
            "base": record.get("base"), "tuned": record.get("tuned"), "modules": record["modules"],
            "max_error": max(errors, default=None), "mean_error": sum(errors) / len(errors) if errors else None,
            "modules_to_save": record.get("modules_to_save"), "not_extracted": record.get("not_extracted"),
        }
    return out
