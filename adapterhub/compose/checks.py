"""Compatibility checks: an adapter against a base model, and adapters against each other.

The base is anything that satisfies :class:`BaseView`: a checkpoint directory
(:class:`adapterhub.base.BaseCheckpoint`) or a live model (:class:`adapterhub.runtime.view.LiveModel`),
so ``adapterhub check`` and ``adapterhub.attach`` run the same checks.

Every check returns a :class:`Report` listing each problem with what, where and what to do; nothing
is raised for an incompatibility (``Report.raise_for_errors()`` does that on request).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from adapterhub.adapter import Adapter, BaseModelRef
from adapterhub.errors import CompatibilityError
from adapterhub.tensorfile import FLOAT_DTYPES

Severity = Literal["error", "warning", "info"]
#: leading path components an adapter's module names may have that the checkpoint's lack, or vice versa
MAX_PREFIX_PARTS = 2


class TensorMeta(Protocol):
    """A base tensor as the checks see it: name, safetensors dtype name (``"BF16"``), shape."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


class BaseView(Protocol):
    """What the checks read of a base model, on disk or live.

    ``path`` names it in reports; ``tensors`` maps every weight name to its :class:`TensorMeta`;
    ``modules`` maps a module path to its weight's name; ``fingerprint()`` is None where it cannot be
    computed (a live model: its tensors may have been cast or tied since loading).
    """

    @property
    def path(self) -> Path: ...
    @property
    def tensors(self) -> Mapping[str, TensorMeta]: ...
    @property
    def modules(self) -> Mapping[str, str]: ...
    @property
    def name_or_path(self) -> str | None: ...
    @property
    def hidden_size(self) -> int | None: ...
    @property
    def num_layers(self) -> int | None: ...
    @property
    def num_kv_heads(self) -> int | None: ...
    @property
    def head_dim(self) -> int | None: ...
    @property
    def model_type(self) -> str | None: ...
    @property
    def architectures(self) -> Sequence[str] | None: ...
    @property
    def quantization(self) -> dict[str, Any] | None: ...
    def fingerprint(self) -> str | None: ...


@dataclass(frozen=True)
class Problem:
    """One finding: ``error`` makes the pair incompatible, ``warning``/``info`` do not."""

    severity: Severity
    code: str
    where: str
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.severity}[{self.code}] {self.where}: {self.message}{fix}"


@dataclass(frozen=True)
class Report:
    """The outcome of a compatibility check."""

    subject: str
    against: str
    problems: tuple[Problem, ...] = ()
    resolved: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "against": self.against, "compatible": self.ok,
                "problems": [asdict(p) for p in self.problems], "resolved": dict(self.resolved)}

    def summary(self) -> str:
        head = "compatible" if self.ok else "INCOMPATIBLE"
        n_err, n_warn = len(self.errors), len(self.warnings)
        return f"{self.subject} vs {self.against}: {head} ({n_err} error(s), {n_warn} warning(s))"

    def raise_for_errors(self) -> None:
        """Raise :class:`CompatibilityError` carrying this report if it has errors."""
        if not self.ok:
            lines = "\n".join("  " + p.line() for p in self.errors)
            raise CompatibilityError(f"{self.summary()}\n{lines}", report=self)


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        #: (adapter-only prefix, base-only prefix) -> an adapter path resolved that way
        self.translations: dict[tuple[str, str], str] = {}

    def resolved(self, module: str, match: str) -> None:
        self.translations.setdefault(translation(module, match), module)

    def add(self, severity: Severity, code: str, where: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem(severity, code, where, message, fix))


# --- name resolution -----------------------------------------------------------------------------


def resolve_module(module: str, base_modules: Sequence[str] | dict[str, Any]) -> tuple[str | None, list[str]]:
    """Find the base module an adapter's module path names, tolerating a wrapper prefix on one side.

    The path matches a base path that is equal to it, that it ends with after up to
    ``MAX_PREFIX_PARTS`` leading wrapper components (``base_model.model.``, ``model.``), or that ends
    with it after up to ``MAX_PREFIX_PARTS`` components the adapter lacks (``model.``, ``bert.``).
    Never both: replacing one prefix by another (``model.layers.0`` onto ``model.decoder.layers.0``)
    would map a module onto a structurally different one. Returns ``(match, candidates)``: ``match``
    is None when nothing or more than one module fits; ``candidates`` lists the ties.
    """
    names = base_modules if isinstance(base_modules, dict) else dict.fromkeys(base_modules)
    if module in names:
        return module, [module]
    parts = module.split(".")
    for strip in range(1, min(MAX_PREFIX_PARTS, len(parts) - 1) + 1):
        suffix = ".".join(parts[strip:])
        if suffix in names:
            return suffix, [suffix]
    depth = module.count(".")
    found = [b for b in names if b.endswith("." + module) and b.count(".") - depth <= MAX_PREFIX_PARTS]
    if len(found) == 1:
        return found[0], found
    return None, sorted(found)


def translation(module: str, match: str) -> tuple[str, str]:
    """(prefix only the adapter's path has, prefix only the base's path has) for a resolved pair."""
    if match == module:
        return "", ""
    if module.endswith("." + match):
        return module[: -len(match)], ""
    return "", match[: -len(module)]


def _resolve_tensor(name: str, base: BaseView, c: _Collector | None = None) -> str | None:
    """Base tensor for a carried adapter tensor (``lm_head.weight``, ``...embed_tokens.base_layer.weight``)."""
    plain = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
    module, _, param = plain.rpartition(".")
    owners = {n.rpartition(".")[0]: None for n in base.tensors if n.endswith("." + param)}
    match, _ = resolve_module(module, owners)
    if match is not None and c is not None:
        c.resolved(module, match)
    return f"{match}.{param}" if match is not None else None


# --- adapter vs base ---------------------------------------------------------------------------


def check_adapter(adapter: Adapter, base: BaseView, *, subject: str | None = None,
                  strict_identity: bool = False, scan_values: bool = True) -> Report:
    """Check that ``adapter`` applies to ``base``: targets, shapes, dtypes, kind rules, base identity and
    architecture, NaN/Inf in the weights.

    Args:
        strict_identity: a recorded base name that differs from the checkpoint's is an error
            instead of a warning. A recorded fingerprint that differs is always an error.
        scan_values: read every weight to report NaN/Inf (from the file bytes, without torch; off when the
            caller has scanned already).
    """
    c = _Collector()
    resolved: dict[str, str] = {}
    label = subject or str(adapter.source or adapter.name or "adapter")
    if base.quantization is not None:
        _quantized(base, c)
        return Report(subject=label, against=str(base.path), problems=tuple(c.problems))
    _check_identity(adapter.base, base, c, strict_identity)
    _check_values(adapter, c, scan_values)
    if adapter.kind == "lora":
        _check_lora(adapter, base, c, resolved)
    elif adapter.kind == "ia3":
        _check_ia3(adapter, base, c, resolved)
    elif adapter.kind == "prefix":
        _check_prefix(adapter, base, c)
    else:
        _check_bottleneck(adapter, base, c, resolved)
    if adapter.kind in ("lora", "ia3"):
        _check_carried(adapter, base, c, resolved)
    _check_translation(c, base)
    if adapter.kind in ("lora", "ia3") and len(c.translations) == 1:
        _check_config_targets(adapter, base, c)
    return Report(subject=label, against=str(base.path), problems=tuple(c.problems), resolved=resolved)


def _check_config_targets(adapter: Adapter, base: BaseView, c: _Collector) -> None:
    """What a PEFT config targets in this base beyond the weights it holds: PEFT wraps those modules too. A norm
    or other 1-d module cannot be adapted (PEFT refuses to load); a module without weights keeps PEFT's initial
    values, a no-op except for random initialisations (``init_lora_weights: false`` or ``orthogonal``,
    ``init_ia3_weights: false``), whose result nobody can reproduce."""
    from adapterhub.formats import peft_config

    config = adapter.extra.get("peft")
    target = (config or {}).get("target_modules")
    if not isinstance(config, dict) or target is None or (isinstance(target, str) and target.lower() == "all-linear"):
        return
    ((a_prefix, b_prefix),) = c.translations
    have = set(adapter.modules()) | {n.rpartition(".")[0] for n in adapter.extra.get("ignored") or {}}
    random_init = (config.get("init_lora_weights", True) in (False, "orthogonal") if adapter.kind == "lora"
                   else config.get("init_ia3_weights", True) is False)
    unsupported, missing = [], []
    for module, weight in sorted(base.modules.items()):
        if not module.startswith(b_prefix):
            continue
        name = a_prefix + module[len(b_prefix):]
        if name in have or not peft_config.targets(config, name):
            continue
        if len(base.tensors[weight].shape) not in (2, 4):
            unsupported.append(name)
        else:
            missing.append(name)
    if unsupported:
        c.add("error", "target-unsupported", unsupported[0],
              f"the config's target_modules={target!r} also match {len(unsupported)} module(s) PEFT cannot adapt "
              f"({', '.join(unsupported[:3])}: 1-d weights such as norms); PEFT refuses to load this adapter",
              "narrow target_modules to the modules the adapter was trained on")
    if missing and random_init:
        init = "init_lora_weights" if adapter.kind == "lora" else "init_ia3_weights"
        c.add("error", "target-without-weights", missing[0],
              f"the config targets {len(missing)} module(s) the weights do not hold ({', '.join(missing[:3])}); "
              f"with {init}={config.get(init)!r} PEFT gives them random initial weights, which cannot be reproduced",
              "narrow target_modules to the modules the adapter was trained on")


def _quantized(base: BaseView, c: _Collector) -> None:
    q = base.quantization or {}
    bits = f", {q['bits']}-bit" if q.get("bits") else ""
    c.add("error", "base-quantized", str(base.path),
          f"this base checkpoint is quantized ({q.get('method')}{bits}; {q.get('evidence')}): its weights are stored "
          "packed and scaled, so adapters are neither checked against them nor folded into them",
          "use the full-precision base the quantized model was made from: an adapter trained on a quantized base "
          "(QLoRA) applies to, and folds into, that full-precision model (pass its directory as --base)")


def _check_values(adapter: Adapter, c: _Collector, scan: bool) -> None:
    """NaN/Inf in the adapter's weights (scanned from the file bytes), and weights the config leaves unapplied."""
    from adapterhub.finite import scan_adapter

    for name, count in sorted(scan_adapter(adapter).items() if scan else ()):
        c.add("error", "non-finite", name, f"holds {count} NaN/Inf value(s)",
              "the adapter's weights are broken (training diverged or the file is damaged); re-export them")
    ignored = adapter.extra.get("ignored") or {}
    if ignored:
        reasons = sorted(set(ignored.values()))
        c.add("warning", "not-applied", "adapter",
              f"{len(ignored)} tensor(s) of the weights file are not applied ({', '.join(sorted(ignored)[:3])}"
              f"{', ...' if len(ignored) > 3 else ''}): {reasons[0]}",
              "nothing to do if that is intended; otherwise fix the config (PEFT applies exactly the same)")


def _check_translation(c: _Collector, base: BaseView) -> None:
    """Every adapter path must map onto the base with one and the same wrapper prefix: a model's modules do
    not sit under different wrappers, so mixed prefixes mean the paths were matched onto another structure."""
    if len(c.translations) > 1:
        shown = "; ".join(f"'{a}' -> '{b}' (e.g. {m})" for (a, b), m in sorted(c.translations.items())[:3])
        c.add("error", "target-structure", str(base.path),
              f"the adapter's module paths map onto the base with different prefixes ({shown}), so they do not "
              "describe this base's structure", "the adapter was made for a different architecture")


def _family(cls: str) -> str:
    """A model class's architecture family: ``LlamaForCausalLM`` -> ``llama``, ``GPT2LMHeadModel`` -> ``gpt2``."""
    m = re.match(r"^(.+?)(For[A-Z]\w*|LMHeadModel|EncoderModel|DecoderModel|Model)$", cls)
    return (m.group(1) if m else cls).lower()


def _norm_type(model_type: str) -> str:
    return model_type.lower().replace("-", "_")


def architecture_mismatch(ref: BaseModelRef, model_type: str | None, architectures: Sequence[str] | None,
                          other: str | None = None) -> str | None:
    """Why an adapter recorded for ``ref`` cannot be for a model of ``model_type`` / ``architectures`` (the
    base's, or the adapter ``other``'s), or None when the records agree or do not say."""
    if ref.model_type and model_type and _norm_type(ref.model_type) != _norm_type(model_type):
        theirs = f"{other} was made for" if other else "the base is"
        return f"the adapter was made for a '{ref.model_type}' model, {theirs} a '{model_type}' model"
    if ref.architectures and architectures:
        if not {_family(a) for a in ref.architectures} & {_family(a) for a in architectures}:
            theirs = f"{other} was made with" if other else "the base is"
            return f"the adapter was made with {', '.join(ref.architectures)}, {theirs} {', '.join(architectures)}"
    return None


def _check_identity(ref: BaseModelRef, base: BaseView, c: _Collector, strict: bool) -> None:
    why = architecture_mismatch(ref, base.model_type, base.architectures)
    if why:
        c.add("error", "base-architecture", str(base.path), why,
              "use a base of the architecture the adapter was trained on; module names and sizes can agree "
              "between architectures that compute differently")
    if ref.fingerprint:
        actual = base.fingerprint()
        if actual is None:
            c.add("info", "base-fingerprint", str(base.path),
                  "the adapter records its base's fingerprint, which cannot be computed for this base (a live model)",
                  "to compare it, run `adapterhub check ADAPTER --base DIR` on the checkpoint the model came from")
        elif actual != ref.fingerprint:
            c.add("error", "base-fingerprint", str(base.path),
                  f"the adapter was trained on a base with fingerprint {ref.fingerprint[:16]}..., this checkpoint "
                  f"has {actual[:16]}... (same architecture, different weights)",
                  "use the exact base the adapter was trained on")
    known = {_norm(n) for n in (base.name_or_path, str(base.path), str(base.path.resolve())) if n}
    if ref.name_or_path and base.name_or_path and _norm(ref.name_or_path) not in known:
        c.add("error" if strict else "warning", "base-name", str(base.path),
              f"the adapter names base '{ref.name_or_path}', the checkpoint says '{base.name_or_path}'",
              "check that this is the model the adapter was trained on")


def _norm(name: str) -> str:
    """Compare model names by their last two path parts, case-insensitively (``org/model``)."""
    return "/".join(name.rstrip("/").split("/")[-2:]).lower()


def _resolve(module: str, base: BaseView, c: _Collector) -> str | None:
    match, candidates = resolve_module(module, base.modules)
    if match is not None:
        c.resolved(module, match)
    if match is None:
        if candidates:
            c.add("error", "target-ambiguous", module,
                  f"matches {len(candidates)} base modules ({', '.join(candidates[:4])})",
                  "the adapter's module names are too short to place; re-export it with full module paths")
        else:
            c.add("error", "target-missing", module, "no weight of this module exists in the base checkpoint",
                  "the adapter was made for a different architecture or layer count")
    return match


def _check_dtypes(adapter: Adapter, names: dict[str, str], where: str, c: _Collector) -> None:
    dtypes = {adapter.tensors.dtype(n) for n in names.values()}
    bad = sorted(d for d in dtypes if d not in FLOAT_DTYPES)
    if bad:
        c.add("error", "dtype", where, f"adapter tensors have non-float dtype {', '.join(bad)}",
              "adapter weights must be floating point; re-export the adapter")
    elif len(dtypes) > 1:
        c.add("warning", "dtype-mixed", where, f"the module's tensors mix dtypes {', '.join(sorted(dtypes))}",
              "they are computed in float32; re-export in one dtype to silence this")


def _targets(adapter: Adapter, base: BaseView, c: _Collector,
             resolved: dict[str, str]) -> Iterator[tuple[str, dict[str, str], TensorMeta]]:
    """Each adapter module whose base weight resolves: (module, role -> tensor name, base weight)."""
    for m in adapter.modules():
        target = _resolve(m, base, c)
        if target is None:
            continue
        w = base.tensors[base.modules[target]]
        resolved[m] = w.name
        if w.dtype not in FLOAT_DTYPES:
            c.add("error", "base-dtype", m, f"the base weight {w.name} is {w.dtype}, not floating point (a quantized "
                  "weight)", "use the full-precision base the quantized model was made from")
            continue
        names = adapter.module_tensors(m)
        _check_dtypes(adapter, names, m, c)
        yield m, names, w


def _check_lora(adapter: Adapter, base: BaseView, c: _Collector, resolved: dict[str, str]) -> None:
    spec = adapter.spec
    dtype_note: set[str] = set()
    for m, names, w in _targets(adapter, base, c, resolved):
        shapes = {role: tuple(adapter.tensors.shape(n)) for role, n in names.items()}
        dtype_note |= {adapter.tensors.dtype(n) for n in names.values()} - {w.dtype}
        embedding = "lora_embedding_A" in names
        a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_role not in names or b_role not in names:
            missing = b_role if a_role in names else a_role
            c.add("error", "lora-incomplete", m, f"has no {missing}", "the adapter file is incomplete; re-export it")
            continue
        a, b = shapes[a_role], shapes[b_role]
        if embedding:
            if len(w.shape) != 2:
                c.add("error", "shape", m, f"embedding LoRA on a {len(w.shape)}-d weight {w.shape}",
                      "the target is not an embedding in this base")
                continue
            vocab, dim = w.shape
            expect_a, expect_b = (a[0], vocab), (dim, b[-1])
        elif len(w.shape) == 4:  # Conv2d
            out_f, in_f = w.shape[0], w.shape[1]
            expect_a, expect_b = (a[0], in_f, *w.shape[2:]), (out_f, b[1], 1, 1)
        else:
            if len(w.shape) != 2:
                c.add("error", "shape", m, f"LoRA on a {len(w.shape)}-d weight {w.shape} is not supported", "")
                continue
            out_f, in_f = (w.shape[1], w.shape[0]) if spec.fan_in_fan_out else w.shape
            expect_a, expect_b = (a[0], in_f), (out_f, b[-1])
        layout = " (fan_in_fan_out: the base stores it as in x out)" if spec.fan_in_fan_out else ""
        if tuple(a) != tuple(expect_a):
            c.add("error", "shape", m, f"{a_role} is {tuple(a)}, expected {tuple(expect_a)} for base weight "
                  f"{w.name} {w.shape}{layout}", "the adapter was made for a model with other dimensions")
        if tuple(b) != tuple(expect_b):
            c.add("error", "shape", m, f"{b_role} is {tuple(b)}, expected {tuple(expect_b)} for base weight "
                  f"{w.name} {w.shape}{layout}", "the adapter was made for a model with other dimensions")
        r_a, r_b = a[0], (b[1] if len(b) > 1 else b[0])
        declared = spec.rank(m)
        if r_a != r_b:
            c.add("error", "rank", m, f"{a_role} has rank {r_a} but {b_role} has rank {r_b}",
                  "the adapter file is inconsistent; re-export it")
        elif r_a != declared:
            c.add("error", "rank", m, f"tensors have rank {r_a} but the config gives this module r={declared}",
                  "fix r / rank_pattern in the adapter config (PEFT would fail with a size mismatch)")
        out_dim = expect_b[0]
        for role in ("lora_magnitude_vector", "lora_B.bias"):
            if role in shapes and shapes[role] != (out_dim,):
                c.add("error", "shape", m, f"{role} is {shapes[role]}, expected ({out_dim},)",
                      "the adapter was made for a model with other dimensions")
    if spec.use_dora:
        c.add("info", "dora", "adapter", "DoRA: merging renormalises each row of the weight to its magnitude", "")
    if dtype_note:
        c.add("info", "dtype", "adapter", f"adapter dtype(s) {', '.join(sorted(dtype_note))} differ from the base's; "
              "folding computes in float32 and rounds once to the base dtype", "")


def _check_ia3(adapter: Adapter, base: BaseView, c: _Collector, resolved: dict[str, str]) -> None:
    spec = adapter.spec
    for m, names, w in _targets(adapter, base, c, resolved):
        if len(w.shape) != 2:
            c.add("error", "shape", m, f"IA3 on a {len(w.shape)}-d weight {w.shape} is not supported", "")
            continue
        out_f, in_f = (w.shape[1], w.shape[0]) if spec.fan_in_fan_out else w.shape
        v = tuple(adapter.tensors.shape(names["ia3_l"]))
        ff = spec.is_feedforward(m)
        expect = (1, in_f) if ff else (out_f, 1)
        if v != expect:
            side = "input (feed-forward module)" if ff else "output"
            other = (out_f, 1) if ff else (1, in_f)
            hint = ("the vector is on the other side: feedforward_modules in the config is wrong"
                    if v == other else "the adapter was made for a model with other dimensions")
            c.add("error", "ia3-vector", m, f"ia3_l is {v}; scaling the {side} of {w.name} {w.shape} needs {expect}",
                  hint)


def _check_carried(adapter: Adapter, base: BaseView, c: _Collector, resolved: dict[str, str]) -> None:
    for name in adapter.carried():
        target = _resolve_tensor(name, base, c)
        if target is None:
            c.add("error", "target-missing", name, "this saved module (modules_to_save) has no counterpart in the base",
                  "the adapter was made for a model with another head or architecture")
            continue
        resolved[name] = target
        have, want = adapter.tensors.shape(name), base.tensors[target].shape
        if tuple(have) != tuple(want):
            c.add("error", "shape", name, f"saved module weight is {tuple(have)}, base {target} is {want}",
                  "resize the base (e.g. its vocabulary) to match, or use the base the adapter was trained on")


def _check_prefix(adapter: Adapter, base: BaseView, c: _Collector) -> None:
    s = adapter.spec
    layers, kv, hd = base.num_layers, base.num_kv_heads, base.head_dim
    for what, have, want, fix in (
        ("layers", s.num_layers, layers, "the adapter was made for a model with another depth"),
        ("kv-heads", s.num_kv_heads, kv,
         "for GQA models the prefix has one key/value per kv-head; re-create it for this base"),
        ("head_dim", s.head_dim, hd, "the adapter was made for a model with other attention sizes"),
    ):
        if want is None:
            c.add("warning", f"prefix-{what}", "config", f"the base config does not say its {what}; not checked", "")
        elif have is not None and have != want:
            c.add("error", f"prefix-{what}", "prefix", f"the prefix has {what}={have}, the base has {want}", fix)
    if layers and kv and hd and s.width != layers * 2 * kv * hd:
        c.add("error", "prefix-width", "prefix",
              f"each virtual token holds {s.width} values; this base needs {layers} layers x 2 (key, value) x "
              f"{kv} kv-heads x {hd} head_dim = {layers * 2 * kv * hd}",
              "the adapter was made for a model with other attention sizes (or without GQA)")
    saved = sorted(n for n in adapter.tensors if n != "prompt_embeddings") if s.layout == "peft" else []
    if saved:
        c.add("error", "prefix-saved-modules", ", ".join(saved[:3]),
              f"the prefix adapter also holds {len(saved)} saved module tensor(s) (modules_to_save, e.g. a "
              "classification head), which adapterhub does not apply", "apply this adapter with PEFT")
    if s.layout == "peft" and "prompt_embeddings" in adapter.tensors:
        shape = tuple(adapter.tensors.shape("prompt_embeddings"))
        want_shape = (s.num_virtual_tokens, s.width)
        if shape != want_shape:
            c.add("error", "shape", "prompt_embeddings", f"is {shape}, the config implies {want_shape}",
                  "the adapter config and weights disagree; re-export the adapter")


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _check_bottleneck(adapter: Adapter, base: BaseView, c: _Collector, resolved: dict[str, str]) -> None:
    s = adapter.spec
    hidden = base.hidden_size
    if hidden is None:
        c.add("warning", "bottleneck-hidden", "config", "the base config does not give hidden_size; not checked", "")
    elif s.hidden_size is not None and s.hidden_size != hidden:
        c.add("error", "bottleneck-hidden", "adapter",
              f"the adapter works on hidden size {s.hidden_size}, the base has {hidden}",
              "the adapter was made for a model of another width")
    layers = base.num_layers
    locations: dict[str, list[str]] = {}
    for n in adapter.tensors:
        loc = n.split(".adapters.")[0] if ".adapters." in n else None
        if loc is not None:
            locations.setdefault(loc, []).append(n)
    owners = {n.rpartition(".")[0]: None for n in base.tensors}
    prefixes: dict[str, None] = {}
    for o in owners:
        parts = o.split(".")
        for i in range(1, len(parts) + 1):
            prefixes[".".join(parts[:i])] = None
    for loc in sorted(locations):
        m = _LAYER_RE.search(loc)
        if layers is not None and m and int(m.group(1)) >= layers:
            c.add("error", "target-missing", loc, f"layer {m.group(1)} does not exist; the base has {layers} layers",
                  "the adapter was made for a deeper model")
            continue
        # the library inserts modules of its own (``output_adapters``); their parent must exist
        host = loc.rpartition(".")[0] if loc.endswith("_adapters") else loc
        match, cands = resolve_module(host, prefixes)
        if match is None:
            c.add("error", "target-missing" if not cands else "target-ambiguous", loc,
                  "this adapter location is not a module of the base", "the adapter was made for another architecture")
        else:
            resolved[loc] = match
            c.resolved(host, match)
        if hidden is not None:
            for n in locations[loc]:
                shp = adapter.tensors.shape(n)
                if n.endswith("adapter_down.0.weight") and len(shp) == 2 and shp[1] != hidden:
                    c.add("error", "shape", n, f"down-projection reads {shp[1]} features, the base hidden size is "
                          f"{hidden}", "the adapter was made for a model of another width")
                if n.endswith("adapter_up.weight") and len(shp) == 2 and shp[0] != hidden:
                    c.add("error", "shape", n, f"up-projection writes {shp[0]} features, the base hidden size is "
                          f"{hidden}", "the adapter was made for a model of another width")


# --- adapter vs adapter --------------------------------------------------------------------------


def check_composable(adapters: Sequence[Adapter], *, mode: Literal["blend", "stack"] = "blend",
                     names: Sequence[str] | None = None) -> Report:
    """Check that adapters can be blended or stacked: same kind, same base, agreeing module shapes."""
    c = _Collector()
    labels = list(names) if names else [str(a.source or a.name or f"#{i}") for i, a in enumerate(adapters)]
    subject = " + ".join(labels)
    if len(adapters) < 1:
        c.add("error", "empty", "-", "no adapters given", "pass at least one adapter")
        return Report(subject, "each other", tuple(c.problems))
    first = adapters[0]
    for label, a in zip(labels[1:], adapters[1:], strict=True):
        if a.kind != first.kind:
            c.add("error", "kind-mismatch", label, f"is {a.kind}, {labels[0]} is {first.kind}",
                  "only adapters of one kind can be combined")
    if c.problems:
        return Report(subject, "each other", tuple(c.problems))
    fps = {a.base.fingerprint for a in adapters if a.base.fingerprint}
    if len(fps) > 1:
        c.add("error", "base-fingerprint", subject, "the adapters were trained on different base weights "
              f"({len(fps)} fingerprints)", "combine only adapters of one base")
    for label, a in zip(labels[1:], adapters[1:], strict=True):
        why = architecture_mismatch(a.base, first.base.model_type, first.base.architectures, other=labels[0])
        if why:
            c.add("error", "base-architecture", label, why, "combine only adapters of one architecture")
    base_names = {_norm(a.base.name_or_path) for a in adapters if a.base.name_or_path}
    if len(base_names) > 1:
        c.add("warning", "base-name", subject, f"the adapters name different bases: {', '.join(sorted(base_names))}",
              "check that they share one base model")
    kind = first.kind
    if kind in ("lora", "ia3"):
        _compose_modules(adapters, labels, c)
    elif kind == "bottleneck":
        if mode == "stack":
            c.add("error", "bottleneck-stack", subject,
                  "stacking bottleneck adapters is sequential and exists only at run time",
                  "apply them on a live model with the runtime stack, or blend them instead")
        for label, a in zip(labels[1:], adapters[1:], strict=True):
            if (a.spec.architecture, a.spec.config) != (first.spec.architecture, first.spec.config):
                c.add("error", "bottleneck-config", label, f"its config differs from {labels[0]}'s",
                      "parameter averaging needs identical bottleneck configs")
            elif {n: a.tensors.shape(n) for n in a.tensors} != {n: first.tensors.shape(n) for n in first.tensors}:
                c.add("error", "shape", label, f"its tensors differ in names or shapes from {labels[0]}'s", "")
    else:
        for label, a in zip(labels, adapters, strict=True):
            saved = sorted(n for n in a.tensors if n != "prompt_embeddings") if a.spec.layout == "peft" else []
            if saved:
                c.add("error", "prefix-saved-modules", label, f"holds saved module tensors ({', '.join(saved[:3])}; "
                      "modules_to_save, e.g. a classification head) that a prefix blend would drop",
                      "blend prefixes without saved modules")
        for label, a in zip(labels[1:], adapters[1:], strict=True):
            s, f = a.spec, first.spec
            for what in ("num_layers", "num_kv_heads", "token_dim", "layout"):
                if getattr(s, what) != getattr(f, what):
                    c.add("error", "prefix-mismatch", label, f"{what}={getattr(s, what)}, {labels[0]} has "
                          f"{getattr(f, what)}", "prefixes combine only for the same attention layout")
            if mode == "blend" and s.num_virtual_tokens != f.num_virtual_tokens:
                c.add("error", "prefix-length", label, f"has {s.num_virtual_tokens} virtual tokens, {labels[0]} has "
                      f"{f.num_virtual_tokens}", "averaging needs equal prefix lengths; stack them instead")
    return Report(subject, "each other", tuple(c.problems))


def _compose_modules(adapters: Sequence[Adapter], labels: list[str], c: _Collector) -> None:
    first = adapters[0]
    seen: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for label, a in zip(labels, adapters, strict=True):
        if a.kind == "lora" and a.spec.use_dora:
            c.add("error", "dora", label, "DoRA adapters cannot be combined linearly (the magnitude renormalises "
                  "each column)", "merge each DoRA adapter on its own")
        if a.spec.fan_in_fan_out != first.spec.fan_in_fan_out:
            c.add("error", "fan-in-fan-out", label, "fan_in_fan_out differs between the adapters", "")
        for m in a.modules():
            if a.kind == "lora" and a.lora_rank(m) != a.spec.rank(m):
                c.add("error", "rank", f"{label}:{m}", f"tensors have rank {a.lora_rank(m)} but the config gives "
                      f"r={a.spec.rank(m)}, so its scale would be wrong", "fix r / rank_pattern in its config")
            sig = _module_signature(a, m)
            if m in seen and seen[m][1] != sig:
                c.add("error", "shape", m, f"{label} gives it shape {sig}, {seen[m][0]} gives {seen[m][1]}",
                      "the adapters target modules of different sizes: they are for different bases")
            seen.setdefault(m, (label, sig, a.kind))
        if a.kind == "ia3":
            for m in a.modules():
                if first.spec.is_feedforward(m) != a.spec.is_feedforward(m) and m in first.modules():
                    c.add("error", "ia3-side", m, f"{label} scales the other side of this module than {labels[0]}",
                          "IA3 vectors combine only on the same side")


def _module_signature(a: Adapter, m: str) -> tuple[int, ...]:
    names = a.module_tensors(m)
    if a.kind == "ia3":
        return tuple(a.tensors.shape(names["ia3_l"]))
    if "lora_A" in names and "lora_B" in names:
        return (a.tensors.shape(names["lora_B"])[0], *a.tensors.shape(names["lora_A"])[1:])
    if "lora_embedding_A" in names and "lora_embedding_B" in names:
        return (a.tensors.shape(names["lora_embedding_A"])[1], a.tensors.shape(names["lora_embedding_B"])[0])
    return ()
