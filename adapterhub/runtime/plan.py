"""Check a composition against a live model, then compute everything each module will run; touch nothing.

:func:`make_plan` runs, in this order and before any tensor is loaded: the tree's own rules
(:func:`adapterhub.runtime.compose.validate`), ``check_adapter`` of every adapter against the live
model (the report ``adapterhub check`` prints) extended with what the runtime cannot run, and
``check_composable`` of the LoRAs and of the IA3 adapters among themselves. Any error raises
:class:`~adapterhub.errors.AttachError` with those reports. Then it loads and folds the tensors (a
non-finite value is an error too) into one payload per site. Installing is :mod:`attached`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterhub.adapter import Adapter
from adapterhub.compose.checks import Problem, Report, check_adapter, check_composable, resolve_module
from adapterhub.errors import AdapterHubError, AttachError, CompositionError
from adapterhub.runtime import arch as archmod
from adapterhub.runtime.bottleneck import BottleneckModule, PostLNSite, PreLNSite, covered, unsupported_features
from adapterhub.runtime.compose import Block, linear_terms, ordered_leaves, prune, validate
from adapterhub.runtime.ia3 import ia3_vector
from adapterhub.runtime.linear import LinearSite, is_linear_like, merged_copy
from adapterhub.runtime.lora import LoraTerm, concat_plan, dense_delta
from adapterhub.runtime.prefix import PrefixSite, layer_kv
from adapterhub.runtime.view import LiveModel

PREFIX_CONVENTIONS = ("auto", "peft", "adapters")


@dataclass
class Plan:
    """What to install: site key -> (factory building the site, payload it runs)."""

    sites: dict[tuple[str, str], tuple[Callable[[], Any], dict[str, Any]]] = field(default_factory=dict)
    reports: list[Report] = field(default_factory=list)
    merged_weights: int = 0
    merged_bytes: int = 0
    prefix_tokens: int = 0


def label(adapter: Adapter, index: int) -> str:
    return str(adapter.source or adapter.name or f"adapter #{index}")


def kind_of(leaf: Any) -> str:
    if not isinstance(leaf, Adapter):
        raise CompositionError(
            f"the runtime takes Adapter values, got {type(leaf).__name__} {leaf!r}.\n"
            "  fix: use adapterhub.attach(), which reads adapter directories and registry references, "
            "or read the adapter first with adapterhub.formats.read_adapter().")
    return leaf.kind


class _Loaded:
    """Each adapter's tensors loaded once per plan (``Tensors`` reads the file on every index)."""

    def __init__(self, cache: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
        self.cache = cache if cache is not None else {}
        self.bad: dict[int, list[str]] = {}

    def get(self, adapter: Adapter, name: str) -> torch.Tensor:
        per = self.cache.setdefault(id(adapter), {})
        if name in per:
            return per[name]
        t = adapter.tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            self.bad.setdefault(id(adapter), []).append(name)
            return t  # not cached: the next plan checks it again
        per[name] = t
        return t


def make_plan(model: nn.Module, tree: Block, *, merge: bool = False, prefix_positions: str = "auto",
              reports: dict[int, Report] | None = None,
              tensor_cache: dict[int, dict[str, torch.Tensor]] | None = None) -> Plan:
    """Check ``tree`` against ``model`` and compute every site's payload.

    ``reports`` caches each adapter's report by ``id(adapter)`` across calls (swap, set_weights);
    ``tensor_cache`` caches loaded tensors the same way.

    Raises:
        CompositionError: the tree breaks a block's rules.
        AttachError: an adapter does not fit the model or the others (carrying the reports).
    """
    reports = reports if reports is not None else {}
    leaves, live, arch, names = check_tree(model, tree, prefix_positions=prefix_positions, reports=reports)
    return _build(model, tree, leaves, live, arch, reports, merge, prefix_positions, _Loaded(tensor_cache), names)


def check_tree(model: nn.Module, tree: Block, *, prefix_positions: str = "auto", reports: dict[int, Report],
               live: LiveModel | None = None) -> tuple[list[Adapter], LiveModel, archmod.Arch | None,
                                                       dict[str, nn.Module]]:
    """Every check :func:`make_plan` runs, reading no tensor: the leaves, the model's view, its arch row and
    module map. ``reports`` receives each adapter's report by ``id(adapter)`` (``resolved`` maps its
    modules to the model's weights); ``live`` reuses a view of the model built before (the model unchanged).

    Raises:
        CompositionError: the tree breaks a block's rules.
        AttachError: an adapter does not fit the model or the others (carrying the reports).
    """
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise CompositionError(f"attach() needs a transformers model (an nn.Module with a .config), got "
                               f"{type(model).__name__}.\n  fix: pass a model loaded with transformers, e.g. "
                               "AutoModelForCausalLM.from_pretrained(BASE).")
    if prefix_positions not in PREFIX_CONVENTIONS:
        raise CompositionError(f"prefix_positions must be one of {', '.join(PREFIX_CONVENTIONS)}, "
                               f"not {prefix_positions!r}.")
    leaves: list[Adapter] = list(tree.leaves())
    for leaf in leaves:
        kind_of(leaf)
    validate(tree, kind_of)
    if live is None or live.modules_by_path is None:
        live = LiveModel(model, _module_names(model))
    names = live.modules_by_path
    arch = archmod.arch_for(live.model_type)
    failed: list[Report] = []
    distinct: list[tuple[int, Adapter]] = []  # (first leaf index, adapter), each adapter once
    for i, a in enumerate(leaves):
        if all(a is not b for _, b in distinct):
            distinct.append((i, a))
    for i, a in distinct:
        if id(a) not in reports:
            base = check_adapter(a, live, subject=label(a, i))
            extra = _runtime_problems(a, base, live, arch, model, names)
            reports[id(a)] = Report(base.subject, base.against, base.problems + tuple(extra), base.resolved)
        if not reports[id(a)].ok:
            failed.append(reports[id(a)])
    for kind in ("lora", "ia3"):
        group = [(i, a) for i, a in distinct if a.kind == kind]
        if len(group) > 1:
            r = check_composable([a for _, a in group], mode="blend", names=[label(a, i) for i, a in group])
            if not r.ok:
                failed.append(r)
    prefixes = [(i, a) for i, a in distinct if a.kind == "prefix"]
    conventions = {_convention(a, prefix_positions) for _, a in prefixes}
    if len(conventions) > 1:
        failed.append(Report(" + ".join(label(a, i) for i, a in prefixes), "each other", (Problem(
            "error", "prefix-convention", "prefixes",
            "PEFT and `adapters`-library prefixes number the real tokens differently and cannot be stacked",
            "stack prefixes from one library, or force one convention with prefix_positions="),)))
    if failed:
        raise _attach_error(failed, live)
    return leaves, live, arch, names


def _attach_error(failed: list[Report], live: LiveModel) -> AttachError:
    lines = []
    for r in failed:
        lines += [p.line() for p in r.problems] + [r.summary()]
    body = "\n".join("  " + line for line in lines)
    return AttachError(f"cannot attach to {type(live.model).__name__} ({live.path}): {len(failed)} report(s) with "
                       f"errors; the model was not changed.\n{body}\n"
                       "  fix: resolve the errors above (`adapterhub check ADAPTER --base DIR` prints the same report "
                       "for a checkpoint directory).", reports=failed)


def _convention(a: Adapter, forced: str) -> str:
    if forced != "auto":
        return forced
    return "peft" if a.spec.layout == "peft" else "adapters"


def _runtime_problems(a: Adapter, report: Report, live: LiveModel, arch: archmod.Arch | None,
                      model: nn.Module, names: dict[str, nn.Module]) -> list[Problem]:
    """What ``check_adapter`` accepts but the runtime cannot run."""
    out: list[Problem] = []

    def err(code: str, where: str, message: str, fix: str) -> None:
        out.append(Problem("error", code, where, message, fix))

    if a.kind in ("lora", "ia3"):
        if a.kind == "lora" and a.spec.use_dora:
            err("runtime-dora", "adapter", "DoRA renormalises each weight column by its merged norm; the runtime "
                "does not compute that", "merge it into a copy of the base with `adapterhub export`")
        for name in a.carried():
            err("runtime-carried", name, "a saved copy of a base module (modules_to_save) replaces that module's "
                "weights, which the runtime never does", "export a merged checkpoint, or drop modules_to_save")
        for m in a.modules():
            roles = a.module_tensors(m)
            weight = report.resolved.get(m)
            if weight is None:
                continue
            if "lora_embedding_A" in roles:
                err("runtime-module", m, "LoRA on an embedding is not run by the runtime",
                    "export a merged checkpoint with `adapterhub export`")
                continue
            path = weight.rpartition(".")[0]
            module = names[path] if path in names else model.get_submodule(path)
            if not is_linear_like(module):
                err("runtime-module", m, f"the base module is a {type(module).__name__}; the runtime attaches to "
                    "nn.Linear and Conv1D modules", "load the base unquantised, or merge the adapter")
    elif arch is None and a.kind in ("bottleneck", "prefix"):
        err("runtime-arch", "model", f"{a.kind} adapters need a placement row for model_type "
            f"{live.model_type!r}; rows exist for {', '.join(archmod.known_model_types())}",
            "add a row to adapterhub/runtime/arch.py (and a test against the adapters library)")
    elif a.kind == "bottleneck":
        for what in unsupported_features(a.spec.config):
            err("runtime-bottleneck", "config", f"bottleneck adapters with {what} are not run by the runtime", "")
        for loc in sorted({n.split(".adapters.")[0] for n in a.tensors if ".adapters." in n}):
            split = archmod.split_location(arch, loc)
            if split is None:
                err("runtime-location", loc, f"no {arch.name} placement for this location; the table knows "
                    f"{', '.join(arch.bottleneck)}", "add it to the row in adapterhub/runtime/arch.py")
                continue
            if resolve_module(split[0], names)[0] is None:
                err("target-missing", loc, f"the layer {split[0]} is not a module of this model",
                    "the adapter was made for another architecture or depth")
    elif a.kind == "prefix":
        if a.spec.num_transformer_submodules != 1:
            err("runtime-prefix", "prefix", "encoder-decoder prefixes are not run by the runtime", "")
        if getattr(model, "base_model", None) is None:
            err("runtime-prefix", "model", "the model has no base_model to feed the prefix to", "")
    return out


def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n}


# --- payloads ------------------------------------------------------------------------------------


def _build(model: nn.Module, tree: Block, leaves: list[Adapter], live: LiveModel, arch: archmod.Arch | None,
           reports: dict[int, Report], merge: bool, prefix_positions: str, loaded: _Loaded,
           names: dict[str, nn.Module]) -> Plan:
    plan = Plan(reports=[reports[id(a)] for a in {id(a): a for a in leaves}.values()])
    _linear_sites(model, tree, leaves, reports, merge, loaded, plan)
    if arch is not None:
        _bottleneck_sites(model, tree, leaves, arch, loaded, plan, names)
        _prefix_site(model, tree, leaves, live, prefix_positions, plan, names)
    bad = [(a, loaded.bad[id(a)]) for a in {id(a): a for a in leaves}.values() if id(a) in loaded.bad]
    if bad:
        failed = [Report(label(a, 0), str(live.path), tuple(
            Problem("error", "non-finite", n, "holds NaN or Inf values", "re-export or retrain the adapter")
            for n in names)) for a, names in bad]
        raise _attach_error(failed, live)
    return plan


def _linear_sites(model: nn.Module, tree: Block, leaves: list[Adapter], reports: dict[int, Report], merge: bool,
                  loaded: _Loaded, plan: Plan) -> None:
    lora: dict[str, list[LoraTerm]] = {}
    ia3: dict[str, dict[str, list[tuple[torch.Tensor, float]]]] = {}
    for idx, coeff in linear_terms(tree, kind_of, "lora"):
        a = leaves[idx]
        for m in a.modules():
            path = reports[id(a)].resolved[m].rpartition(".")[0]
            names = a.module_tensors(m)
            bias = loaded.get(a, names["lora_B.bias"]) if "lora_B.bias" in names else None
            lora.setdefault(path, []).append(LoraTerm(loaded.get(a, names["lora_A"]), loaded.get(a, names["lora_B"]),
                                                      coeff * a.spec.scale(m), bias))
    for idx, exponent in linear_terms(tree, kind_of, "ia3"):
        a = leaves[idx]
        for m in a.modules():
            path = reports[id(a)].resolved[m].rpartition(".")[0]
            side = "ia3_in" if a.spec.is_feedforward(m) else "ia3_out"
            vector = loaded.get(a, a.module_tensors(m)["ia3_l"])
            ia3.setdefault(path, {}).setdefault(side, []).append((vector, exponent))
    for path in sorted(set(lora) | set(ia3)):
        module = model.get_submodule(path)
        weight = module.weight
        payload: dict[str, Any] = {}
        for side, terms in ia3.get(path, {}).items():
            v = ia3_vector(terms, where=path)
            payload[side] = None if v is None else v.to(weight.device)
        if merge:
            if type(module) is not nn.Linear:
                raise CompositionError(f"merge=True folds into nn.Linear weights; {path} is a {type(module).__name__}."
                                       "\n  fix: attach without merge=True.")
            delta, bias = dense_delta(lora.get(path, []), device=weight.device)
            payload = {"merged": merged_copy(module, delta, bias, payload.get("ia3_in"), payload.get("ia3_out"))}
            plan.merged_weights += 1
            plan.merged_bytes += sum(t.numel() * t.element_size() for t in payload["merged"] if t is not None)
        elif path in lora:
            payload["lora"] = concat_plan(lora[path], dtype=weight.dtype, device=weight.device)
        _require_finite(path, payload, weight.dtype)
        plan.sites[("linear", path)] = (lambda m=module, p=path: LinearSite(m, p), payload)


def _require_finite(path: str, payload: dict[str, Any], dtype: torch.dtype) -> None:
    """Finite adapters can overflow once composition weights and scales are folded in (and rounded to the
    model's dtype): refuse the composition rather than run a model that answers NaN."""
    lora = payload.get("lora")
    tensors = [lora.a, lora.bt, lora.bias] if lora is not None else []
    tensors += [payload.get("ia3_in"), payload.get("ia3_out"), *(payload.get("merged") or ())]
    if any(t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
        raise CompositionError(f"the composition overflows at {path}: its weights and scales folded into the "
                               f"adapter's factors give NaN or Inf in {str(dtype).removeprefix('torch.')}.\n"
                               "  fix: use smaller composition weights (or check the adapters' alpha).")


def _bottleneck_sites(model: nn.Module, tree: Block, leaves: list[Adapter], arch: archmod.Arch, loaded: _Loaded,
                      plan: Plan, names: dict[str, nn.Module]) -> None:
    is_bn = [a.kind == "bottleneck" for a in leaves]
    if not any(is_bn):
        return
    pruned = prune(tree, lambda i: is_bn[i])
    # site path -> (factory, {leaf index: module})
    places: dict[str, tuple[Callable[[], Any], dict[int, BottleneckModule]]] = {}
    for idx, a in enumerate(leaves):
        if not is_bn[idx]:
            continue
        by_loc: dict[str, dict[str, torch.Tensor]] = {}
        for n in a.tensors:
            if ".adapters." in n:
                loc, role = n.split(".adapters.", 1)
                by_loc.setdefault(loc, {})[role] = n
        for loc, roles in by_loc.items():
            layer_path, key = archmod.split_location(arch, loc)
            layer_path = resolve_module(layer_path, names)[0]
            layer = names[layer_path]
            _, place = arch.bottleneck[key]
            if isinstance(place, archmod.PostLN):
                path = f"{layer_path}.{place.module}"
                module = layer.get_submodule(place.module)

                def factory(module: nn.Module = module, path: str = path, place: Any = place) -> Any:
                    return PostLNSite(module, path, place)
                ref = getattr(module, place.dense).weight
            else:
                path = f"{layer_path}.{place.sublayer}"

                def factory(layer: nn.Module = layer, path: str = path, place: Any = place) -> Any:
                    return PreLNSite(layer, path, place)
                ref = next(layer.get_submodule(place.sublayer).parameters())
            t = {role: loaded.get(a, n).to(device=ref.device, dtype=ref.dtype) for role, n in roles.items()}
            try:
                mod = BottleneckModule.from_tensors(t, a.spec.config)
            except (KeyError, ValueError) as e:
                raise CompositionError(f"{label(a, idx)}: the bottleneck tensors at {loc} are incomplete ({e}).\n"
                                       "  fix: re-export the adapter.") from e
            places.setdefault(path, (factory, {}))[1][idx] = mod
    for path, (factory, mods) in places.items():
        why = covered(pruned, set(mods))
        if why:
            raise CompositionError(f"at {path}: {why}; the adapters library's Average needs every child at every "
                                   "place it runs.\n  fix: average adapters with the same locations.")
        plan.sites[("bottleneck", path)] = (factory, {"tree": pruned, "mods": mods})


def _prefix_site(model: nn.Module, tree: Block, leaves: list[Adapter], live: LiveModel, prefix_positions: str,
                 plan: Plan, names: dict[str, nn.Module]) -> None:
    from adapterhub.formats.adapters_lib import prefix_to_peft

    order = ordered_leaves(tree, kind_of, "prefix")
    if not order:
        return
    base = model.base_model
    ref = next(base.parameters())
    kvs, convention = [], "peft"
    for idx in order:
        a = leaves[idx]
        convention = _convention(a, prefix_positions)
        try:
            peft = a if a.spec.layout == "peft" else prefix_to_peft(a, num_layers=live.num_layers,
                                                                  num_kv_heads=live.num_kv_heads)
        except AdapterHubError as e:
            raise AttachError(f"{label(a, idx)}: {e}") from e
        values = peft.tensors["prompt_embeddings"]
        if not bool(torch.isfinite(values).all()):
            raise AttachError(f"{label(a, idx)}: the prefix holds NaN or Inf values.\n  fix: re-export or retrain it.")
        kvs.append(layer_kv(values.to(device=ref.device, dtype=ref.dtype), num_layers=live.num_layers,
                            num_kv_heads=live.num_kv_heads, head_dim=live.head_dim))
    kv = torch.cat(kvs, dim=2).contiguous()
    plan.prefix_tokens = kv.shape[2]
    path = next((n for n, m in names.items() if m is base), "") or "<model>"
    config = model.config

    def factory() -> PrefixSite:
        return PrefixSite(base, path, live.model_type, config)

    plan.sites[("prefix", path)] = (factory, {"kv": kv, "convention": convention})
