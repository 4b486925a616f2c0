"""Would vLLM load this adapter with ``--enable-lora``? The rules vLLM's LoRA loader applies, as a Report.

Checked against vLLM 0.33.0 (the PyPI wheel ``vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl``, built
from commit ``4ba787ec9`` as its ``vllm/_version.py`` records), read, not run (vLLM needs a GPU):

- ``vllm/config/lora.py``: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``,
  ``max_lora_rank`` defaults to 16.
- ``vllm/lora/peft_helper.py``, ``PEFTHelper.validate_legal`` / ``_validate_features``: refused when
  ``max(r, *rank_pattern.values()) > max_lora_rank``, ``use_dora``, ``lora_bias``, ``bias != "none"``,
  ``modules_to_save`` other than ``["classifier"]``/``["score"]`` (classification models only),
  ``init_lora_weights`` a string other than gaussian/eva/orthogonal/mica/lora_ga (PiSSA, OLoRA,
  CorDA, LoftQ rewrite the base), aLoRA, ``layer_replication``, BD-LoRA, QALoRA (the last four are
  refused by adapterhub's PEFT reader already).
- ``vllm/lora/utils.py``, ``parse_fine_tuned_lora_name``: a tensor must be ``*.lora_A.weight``,
  ``*.lora_B.weight``, ``*.lora_embedding_A``/``B`` (or a saved ``embed_tokens``/``lm_head``
  ``base_layer`` weight, skipped); anything else is "unsupported LoRA weight".
- ``vllm/lora/lora_model.py``, ``from_local_checkpoint``: reads ``adapter_config.json`` and
  ``adapter_model.safetensors`` (or ``.bin``/``.pt``) of a PEFT directory; each target module's last
  name must be one the served model supports (its linear layers, packed names such as ``qkv_proj``
  expanded to ``q_proj``/``k_proj``/``v_proj``, ``embed_tokens``/``lm_head`` where the model lists them
  in ``embedding_modules``); that depends on the model and is left to vLLM; an embedding LoRA must
  match the model's vocabulary.

Beyond what vLLM refuses, the report calls out what vLLM would load and serve wrongly: NaN/Inf weights, and
tensors whose rank disagrees with the config's ``r`` (vLLM copies the tensors and scales them by
``lora_alpha / r``; PEFT refuses such an adapter).
"""

from __future__ import annotations

from adapterhub.adapter import Adapter
from adapterhub.compose.checks import Problem, Report
from adapterhub.errors import VllmOptionError

#: what ``--max-lora-rank`` may be (vllm/config/lora.py, ``MaxLoRARanks``)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_VERSION = "0.33.0"
#: ``init_lora_weights`` strings vLLM accepts (they only set the initial weights)
_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_HEAD_MODULES = ("classifier", "score")
_BASE_EMBEDDING_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


def check_vllm(adapter: Adapter, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK, *,
               format: str | None = None, subject: str | None = None) -> Report:
    """What vLLM (``--enable-lora --max-lora-rank N``) would refuse in ``adapter``: one problem per finding.

    Args:
        adapter: the adapter, as read from its directory.
        max_lora_rank: vLLM's ``--max-lora-rank``, one of :data:`VLLM_MAX_LORA_RANKS` (default 16).
        format: the format of the directory it was read from (``adapterhub.formats.detect``); vLLM reads
            PEFT directories only. None skips this rule (an adapter built in memory).
        subject: how the report names the adapter.

    Raises:
        VllmOptionError: ``max_lora_rank`` is not a value vLLM accepts.

    Example:
        >>> check_vllm(read_adapter("pulled"), max_lora_rank=32).ok  # doctest: +SKIP
        True
    """
    if isinstance(max_lora_rank, bool) or max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise VllmOptionError(f"vLLM's max_lora_rank must be one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}, "
                              f"not {max_lora_rank!r}.\n  fix: pick the smallest of them that holds your ranks.")
    problems: list[Problem] = []

    def err(code: str, where: str, message: str, fix: str) -> None:
        problems.append(Problem("error", code, where, message, fix))

    name = subject or str(adapter.source or adapter.name or "adapter")
    against = f"vLLM {VLLM_VERSION} (--enable-lora --max-lora-rank {max_lora_rank})"
    if adapter.kind != "lora":
        err("vllm-kind", "adapter", f"a {adapter.kind} adapter; vLLM serves LoRA adapters only",
            "serve it with adapterhub.Pool (LoRA, IA3) or attach() (every kind), or export a merged checkpoint "
            "with `adapterhub export`")
        return Report(name, against, tuple(problems))
    if format is not None and format != "peft":
        err("vllm-format", "directory", f"written in the {format} format; vLLM reads PEFT directories "
            "(adapter_config.json + adapter_model.safetensors)",
            "`adapterhub convert DIR -o OUT --format peft` (or `adapterhub pull REF -o OUT --format peft`)")
    spec = adapter.spec
    config = adapter.extra.get("peft") or {}
    rank = max([spec.r, *map(int, spec.rank_pattern.values())])
    actual = max((adapter.lora_rank(m) for m in adapter.modules()), default=0)
    if max(rank, actual) > max_lora_rank:
        fits = next((n for n in VLLM_MAX_LORA_RANKS if n >= max(rank, actual)), None)
        where = "r" if rank >= actual else "tensors"
        err("vllm-rank", where, f"LoRA rank {max(rank, actual)} is greater than max_lora_rank {max_lora_rank}",
            (f"start vLLM with --max-lora-rank {fits}" if fits else "vLLM allows 512 at most") +
            f", or `adapterhub blend SRC --method svd --rank {max_lora_rank} -o OUT` for a lower-rank copy")
    if spec.use_dora:
        err("vllm-dora", "use_dora", "DoRA: vLLM does not yet support DoRA",
            "merge it into the base with `adapterhub export` and serve that checkpoint")
    if spec.lora_bias or any("lora_B.bias" in adapter.module_tensors(m) for m in adapter.modules()):
        err("vllm-lora-bias", "lora_bias", "LoRA bias (lora_bias): vLLM does not support it",
            "merge it into the base with `adapterhub export`")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        err("vllm-bias", "bias", f"bias={bias!r} (trained base biases): vLLM does not support adapter bias",
            "merge it into the base with `adapterhub export`")
    saved = [m for m in spec.modules_to_save if m not in _HEAD_MODULES]
    if saved:
        err("vllm-modules-to-save", "modules_to_save", f"modules_to_save {saved}: vLLM accepts none, or "
            "['classifier'] / ['score'] of a classification model", "merge it into the base with `adapterhub export`")
    elif spec.modules_to_save:
        problems.append(Problem("warning", "vllm-modules-to-save", "modules_to_save",
                                f"{list(spec.modules_to_save)}: vLLM loads it for classification models only"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _INITS:
        err("vllm-init", "init_lora_weights", f"init_lora_weights={init!r} rewrites the base weights when PEFT "
            "loads the adapter; vLLM refuses it", "convert it with PEFT's path_initial_model_for_weight_conversion")
    heads = tuple(f"{m}.weight" for m in spec.modules_to_save) + tuple(f"{m}.bias" for m in spec.modules_to_save)
    for t in adapter.carried():
        if t.endswith(_BASE_EMBEDDING_SUFFIXES) or t.endswith(heads) or t in heads:
            continue
        err("vllm-tensor", t, "not a LoRA weight vLLM can parse (it reads *.lora_A.weight, *.lora_B.weight, "
            "*.lora_embedding_A/B)", "remove the tensor, or merge the adapter with `adapterhub export`")
    for m in adapter.modules():  # vLLM copies the tensors as they are and scales them by lora_alpha / r of the config
        names = adapter.module_tensors(m)
        a_role, b_role = ("lora_A", "lora_B") if "lora_A" in names else ("lora_embedding_A", "lora_embedding_B")
        if a_role not in names or b_role not in names:
            err("vllm-incomplete", m, f"has no {b_role if a_role in names else a_role}",
                "the adapter file is incomplete; re-export it")
            continue
        r_a, b_shape = adapter.tensors.shape(names[a_role])[0], adapter.tensors.shape(names[b_role])
        r_b = b_shape[1] if len(b_shape) > 1 else b_shape[0]
        if r_a != r_b:
            err("vllm-rank-mismatch", m, f"{a_role} has rank {r_a} but {b_role} has rank {r_b}",
                "the adapter file is inconsistent; re-export it")
        elif r_a != spec.rank(m):
            err("vllm-rank-mismatch", m, f"tensors have rank {r_a} but the config gives this module r={spec.rank(m)}: "
                f"PEFT refuses it, vLLM would scale it by lora_alpha/{spec.rank(m)}",
                "fix r / rank_pattern in adapter_config.json to the tensors' rank")
    from adapterhub.finite import describe, scan_adapter

    bad = scan_adapter(adapter)
    if bad:
        err("vllm-non-finite", "tensors", f"NaN or Inf in {describe(bad)}: vLLM would serve it and answer garbage "
            "for every request that names it", "the adapter's weights are broken (training diverged or the file is "
            "damaged); re-export them")
    embedding = [m for m in adapter.modules() if "lora_embedding_A" in adapter.module_tensors(m)]
    if embedding:
        problems.append(Problem("warning", "vllm-embedding", embedding[0],
                                "embedding LoRA: vLLM loads it only for models that list this module in "
                                "embedding_modules, with the model's own vocabulary size"))
    return Report(name, against, tuple(problems))


def check_directory(path: str, *, base: str | None = None, target: str | None = None, max_lora_rank: int = 16,
                    strict_identity: bool = False, allow_pickle: bool = False) -> list[Report]:
    """What ``adapterhub check`` runs: the adapter directory against a base checkpoint (``base``) and/or
    against a server's loading rules (``target="vllm"``); one report each, in that order."""
    from adapterhub.formats import detect, read_adapter

    fmt = detect(path)
    adapter = read_adapter(path, format=fmt, allow_pickle=allow_pickle)
    reports = []
    if base is not None:
        from adapterhub.base import BaseCheckpoint
        from adapterhub.compose.checks import check_adapter

        reports.append(check_adapter(adapter, BaseCheckpoint.open(base), subject=path, strict_identity=strict_identity))
    if target == "vllm":
        reports.append(check_vllm(adapter, max_lora_rank, format=fmt, subject=path))
    elif target is not None:
        raise VllmOptionError(f"unknown serving target {target!r}.\n  fix: use --for vllm.")
    return reports
