"""Every field of a PEFT config is honoured exactly as PEFT honours it, or refused naming the field.

The oracle is PEFT itself: each adapter (configs edited by hand included) is loaded with
``PeftModel.from_pretrained`` and merged with ``merge_and_unload``; our fold of the same directory must
equal it. docs/peft-config-fields.md is the table these tests prove.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import input_ids, load_base
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig
from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

from adapterhub.base import BaseCheckpoint
from adapterhub.cli import cli
from adapterhub.compose.merge import MergeError, merge_into
from adapterhub.errors import CorruptFileError, InvalidValueError, NonFiniteError, UnsupportedAdapterError
from adapterhub.formats import peft_config, read_adapter

DOCS = Path(__file__).resolve().parent.parent / "docs" / "peft-config-fields.md"
DELETE = object()


def edited(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of an adapter directory with its adapter_config.json edited by hand."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def peft_state(base_dir: Path, adapter_dir: Path, model=None) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(model or load_base(base_dir), adapter_dir).merge_and_unload()
    return model.state_dict()


def max_diff_vs_peft(base_dir: Path, adapter_dir: Path, model=None) -> float:
    """Max abs difference between our fold of the directory and PEFT's merge_and_unload of it."""
    ours = merge_into(BaseCheckpoint.open(base_dir), [read_adapter(adapter_dir)])
    theirs = peft_state(base_dir, adapter_dir, model)
    assert set(ours) - {"embeddings.position_ids"} <= set(theirs)  # a buffer MiniLM's checkpoint still holds
    return max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours if k in theirs)


# --- the table covers every field of the installed PEFT, and the docs show it ----------------------------


@pytest.mark.parametrize(("peft_type", "cls"), [("LORA", LoraConfig), ("IA3", IA3Config),
                                                ("PREFIX_TUNING", PrefixTuningConfig)])
def test_every_field_of_peft_is_decided_and_documented(peft_type, cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    ours = set(peft_config.FIELDS[peft_type])
    assert fields == ours, f"new or removed PEFT fields: {sorted(fields ^ ours)}: decide and document them"
    doc = DOCS.read_text()
    section = doc.split(f"## {cls.__name__}", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z_0-9]+)` \|", section, flags=re.M))
    assert rows == fields, sorted(rows ^ fields)
    # every test the table cites exists
    for file, func in re.findall(r"`(test_[a-z_]+\.py)::(test_[a-z0-9_]+)", doc):
        assert f"def {func}(" in (Path(__file__).parent / file).read_text(), f"{file}::{func}"


# --- configs edited by hand: which weights apply is what PEFT decides --------------------------------------


@pytest.fixture(scope="module")
def qv(llama_base, make_peft) -> Path:
    """LoRA on q_proj and v_proj of both layers."""
    return make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=31)


HAND_EDITS = {
    "layers_to_transform=[0]": ({"layers_to_transform": [0]}, 4),
    "layers_to_transform=1": ({"layers_to_transform": 1}, 4),
    "layers_pattern": ({"layers_to_transform": [1], "layers_pattern": "layers"}, 4),
    "layers_pattern-list": ({"layers_to_transform": [0, 1], "layers_pattern": ["h", "layers"]}, 0),
    "exclude_modules-list": ({"exclude_modules": ["v_proj"]}, 4),
    "exclude_modules-regex": ({"exclude_modules": r".*\.1\..*"}, 4),
    "target_modules-narrower": ({"target_modules": ["q_proj"]}, 4),
    "target_modules-regex": ({"target_modules": r"model\.layers\.0\.self_attn\.(q|v)_proj"}, 4),
    "target_modules-wider": ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, 0),
    "all-linear": ({"target_modules": "all-linear"}, 0),
    "exact-path-ignores-layers": ({"target_modules": ["model.layers.1.self_attn.q_proj", "v_proj"],
                                   "layers_to_transform": [0]}, 4),
    "unknown-unset-field": ({"a_future_peft_field": None}, 0),
    **{f"init_lora_weights={v!r}": ({"init_lora_weights": v}, 0)
       for v in (False, "gaussian", "eva", "orthogonal", "lora_ga", "mica")},
    "inert-fields": ({"lora_dropout": 0.3, "inference_mode": False, "megatron_core": "x", "qalora_group_size": 4,
                      "loftq_config": {"loftq_bits": 4}, "eva_config": {"rho": 2.0}, "peft_version": "0.0.1",
                      "corda_config": {"corda_method": "kpm"}, "lora_ga_config": {"direction": "ArBr"},
                      "task_type": "CAUSAL_LM", "runtime_config": {"ephemeral_gpu_offload": True}}, 0),
}


@pytest.mark.parametrize("name", sorted(HAND_EDITS))
def test_hand_edited_config_equals_peft(name, qv, llama_base, tmp_path):
    changes, n_ignored = HAND_EDITS[name]
    src = edited(qv, tmp_path / "a", **changes)
    adapter = read_adapter(src)
    assert len(adapter.extra.get("ignored", {})) == n_ignored, adapter.extra.get("ignored")
    assert max_diff_vs_peft(llama_base, src) <= 1e-6


def test_layers_to_transform_applies_layer_0_only_as_peft(qv, llama_base, tmp_path):
    """The issue's case: weights for every layer, `layers_to_transform: [0]`: PEFT applies layer 0 only."""
    src = edited(qv, tmp_path / "a", layers_to_transform=[0])
    adapter = read_adapter(src)
    assert adapter.modules() == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert sorted(adapter.extra["ignored"]) == [f"model.layers.1.self_attn.{m}_proj.lora_{x}"
                                                for m in "qv" for x in "AB"]
    ids = input_ids()
    model = load_base(llama_base)
    model.load_state_dict(merge_into(BaseCheckpoint.open(llama_base), [adapter]))
    peft_model = PeftModel.from_pretrained(load_base(llama_base), src).eval()
    everything = load_base(llama_base)  # what folding every layer (the weights, not the config) gives
    everything.load_state_dict(merge_into(BaseCheckpoint.open(llama_base), [read_adapter(qv)]))
    with torch.no_grad():
        ours, theirs, wrong = (m(input_ids=ids).logits for m in (model.eval(), peft_model, everything.eval()))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (wrong - theirs).abs().max() > 1e-3


def test_all_linear_leaves_the_output_embedding_out(llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]), seed=32)
    all_linear = edited(src, tmp_path / "a", target_modules="all-linear")
    adapter = read_adapter(all_linear)
    assert sorted(adapter.extra["ignored"]) == ["lm_head.base_layer.weight", "lm_head.lora_A", "lm_head.lora_B"]
    assert "not target this module" in adapter.extra["ignored"]["lm_head.lora_A"]
    assert max_diff_vs_peft(llama_base, all_linear) <= 1e-6


def test_ia3_exclude_modules_and_feedforward_suffixes_equal_peft(llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                          feedforward_modules=["down_proj"]), seed=33)
    excluded = edited(src, tmp_path / "a", exclude_modules=["k_proj"])
    assert len(read_adapter(excluded).extra["ignored"]) == 2
    assert max_diff_vs_peft(llama_base, excluded) <= 1e-6
    # PEFT matches feedforward_modules as plain suffixes: "proj" makes every target scale its input
    suffix = edited(src, tmp_path / "b", feedforward_modules=["proj"], target_modules=["k_proj", "v_proj",
                                                                                        "down_proj", "proj"])
    adapter = read_adapter(suffix)
    assert all(adapter.spec.is_feedforward(m) for m in adapter.modules())


@pytest.mark.parametrize("variant", ["velora", "monteclora"])
def test_training_only_lora_variants_equal_peft(variant, llama_base, make_peft, tmp_path):
    extra = {"velora": {"velora_config": VeloraConfig(num_groups=4)},
             "monteclora": {"monteclora_config": MontecloraConfig()}}[variant]
    src = make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **extra), seed=34)
    adapter = read_adapter(src)
    assert adapter.extra["ignored"] and all("training-only state" in why for why in adapter.extra["ignored"].values())
    assert not adapter.carried()
    assert max_diff_vs_peft(llama_base, src) <= 1e-6
    # written back, it is a plain LoRA that PEFT loads without missing keys, computing the same
    import warnings

    from adapterhub.formats import write_adapter

    out = write_adapter(adapter, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())[f"{variant}_config"] is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(load_base(llama_base), out)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    ids = input_ids()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(load_base(llama_base), src).eval()(input_ids=ids).logits
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("config", [
    LoraConfig(r=2, target_modules=["query"], bias="all"),
    LoraConfig(r=2, target_modules=["query"], bias="lora_only"),
    IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]),
], ids=["bias-all", "bias-lora_only", "ia3-output-scales-bias"])
def test_minilm_biases_equal_peft(config, minilm_dir, tmp_path):
    """Saved biases replace the base's; an output-side IA3 vector scales the module's bias too (as PEFT's merge)."""
    from peft import get_peft_model

    model = get_peft_model(load_base(minilm_dir), config)
    g = torch.Generator().manual_seed(35)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05 + (0.1 if name.endswith("bias") else 0.0))
    model.save_pretrained(tmp_path / "a")
    assert max_diff_vs_peft(minilm_dir, tmp_path / "a") <= 1e-6


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
], ids=["lora", "ia3"])
def test_gpt2_fan_in_fan_out_folds_equal_peft(config, make_peft, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    src = make_peft(None, config, seed=36, model=GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval())
    assert max_diff_vs_peft(tmp_path / "gpt2", src, GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")) <= 1e-6


def test_prefix_with_saved_modules_is_refused_by_check_and_blend(tmp_path):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from adapterhub.compose.blend import blend
    from adapterhub.compose.checks import check_adapter
    from adapterhub.errors import CompatibilityError

    torch.manual_seed(0)
    from conftest import TINY_LLAMA

    base = LlamaForSequenceClassification(LlamaConfig(**TINY_LLAMA, num_labels=3, pad_token_id=0))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "p")
    adapter = read_adapter(tmp_path / "p")
    assert adapter.extra["peft"]["modules_to_save"] and "base_model.score.weight" in adapter.tensors
    report = check_adapter(adapter, BaseCheckpoint.open(tmp_path / "base"))
    assert [p.code for p in report.errors] == ["prefix-saved-modules"]
    with pytest.raises(CompatibilityError, match="a prefix blend would drop"):
        blend([adapter, adapter])


# --- refusals: the field is named, and the message says what to do ---------------------------------------


def read_error(src: Path, tmp_path: Path, exc: type[Exception], **changes: object) -> str:
    path = edited(src, tmp_path / f"e{len(list(tmp_path.iterdir()))}", **changes)
    with pytest.raises(exc) as info:
        read_adapter(path)
    return str(info.value).split(": ", 1)[1]  # without the leading config path


@pytest.mark.parametrize("target", [["nope"], "nothing_here.*"], ids=["list", "regex"])
def test_target_modules_matching_nothing_is_an_error_as_in_peft(target, qv, llama_base, tmp_path):
    path = edited(qv, tmp_path / "a", target_modules=target)
    with pytest.raises(InvalidValueError) as info:
        read_adapter(path)
    assert str(info.value) == (
        f"{path / 'adapter_config.json'}: target_modules={target!r} match none of the 4 module(s) the weights hold "
        "(model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj, ...): PEFT refuses to load this adapter "
        "('Target modules ... not found').\n  fix: set target_modules to the modules the adapter was trained on.")
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(load_base(llama_base), path)
    # check, export and blend all read it first: each says the same, with exit status 2 and no traceback
    runner = CliRunner()
    for args in (["check", path, "--base", llama_base], ["export", path, "--base", llama_base, "-o", tmp_path / "o"],
                 ["blend", path, qv, "--weights", "0.5,0.5", "-o", tmp_path / "b"]):
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 2 and "match none of the 4 module(s)" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_invalid_regex_and_unreachable_layers_are_errors(qv, tmp_path):
    assert read_error(qv, tmp_path, InvalidValueError, target_modules="(((") == (
        "target_modules '(((' is not a valid regular expression (missing ), unterminated subpattern at position 2)."
        "\n  fix: correct it in the adapter's config; PEFT would fail to load this adapter too.")
    assert "match none of the 4 module(s)" in read_error(qv, tmp_path, InvalidValueError, layers_to_transform=[7])
    assert read_error(qv, tmp_path, InvalidValueError, target_modules=None).startswith("target_modules is null")
    assert "exclude_modules" in read_error(qv, tmp_path, InvalidValueError, exclude_modules=".*")


def test_dora_without_magnitudes_is_refused(qv, llama_base, tmp_path):
    path = edited(qv, tmp_path / "a", use_dora=True)
    with pytest.raises(Exception) as info:
        read_adapter(path)
    assert str(info.value) == (
        f"{path}: use_dora is true but 4 of 4 module(s) have no lora_magnitude_vector (e.g. "
        "model.layers.0.self_attn.q_proj); the adapter cannot be applied as trained.\n  fix: restore the weights "
        "file saved with the adapter, or set use_dora to false only if it was trained as plain LoRA.")
    # PEFT loads it, with every magnitude at the base weight's norm: neither plain LoRA nor the trained adapter
    plain = merge_into(BaseCheckpoint.open(llama_base), [read_adapter(qv)])
    theirs = peft_state(llama_base, path)
    assert (plain["model.layers.0.self_attn.q_proj.weight"] - theirs["model.layers.0.self_attn.q_proj.weight"]
            ).abs().max() > 1e-4


def test_modules_to_save_over_adapted_modules_needs_their_saved_copies(qv, llama_base, tmp_path):
    """PEFT wraps a modules_to_save module instead of adapting it, and loading fails without its saved copy."""
    path = edited(qv, tmp_path / "a", modules_to_save=["v_proj"])
    with pytest.raises(KeyError):
        PeftModel.from_pretrained(load_base(llama_base), path)
    assert read_error(qv, tmp_path, InvalidValueError, modules_to_save=["v_proj"]) == (
        "modules_to_save=['v_proj'] covers module model.layers.0.self_attn.v_proj, whose LoRA weights PEFT then "
        "ignores, but the weights hold no saved copy of it (model.layers.0.self_attn.v_proj.weight): PEFT fails to "
        "load this adapter.\n  fix: remove the entry from modules_to_save, or save the adapter again with PEFT.")


@pytest.mark.parametrize(("key", "value"), [
    ("target_parameters", ["mlp.experts.down_proj"]), ("layer_replication", [[0, 1], [0, 2]]),
    ("alora_invocation_tokens", [1, 2]), ("trainable_token_indices", [1, 2]), ("use_qalora", True),
    ("use_bdlora", {"nblocks": 2}), ("arrow_config", {"top_k": 1}), ("kasa_config", {"beta": 0.1}),
    ("megatron_config", {"x": 1}), ("ensure_weight_tying", True)])
def test_fields_adapterhub_cannot_reproduce_are_refused_by_name(key, value, qv, tmp_path):
    message = read_error(qv, tmp_path, UnsupportedAdapterError, **{key: value})
    assert f"({key}={value!r})" in message and message.endswith("fix: merge it with PEFT instead.")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_inits_that_rewrite_the_base_are_refused(init, qv, tmp_path):
    message = read_error(qv, tmp_path, UnsupportedAdapterError, init_lora_weights=init)
    assert message.startswith(f"init_lora_weights={init!r}: when PEFT loads this adapter it rewrites the base")
    assert "path_initial_model_for_weight_conversion" in message


def test_unknown_fields_that_are_set_are_refused(qv, tmp_path):
    assert read_error(qv, tmp_path, UnsupportedAdapterError, a_future_peft_field=True) == (
        f"config field a_future_peft_field=True is not a LORA field adapterhub knows (it follows PEFT "
        f"{peft_config.PEFT_VERSION}), so what it changes cannot be reproduced.\n  fix: if the field has no effect "
        "on inference, remove it from adapter_config.json; otherwise merge the adapter with the PEFT version that "
        "wrote it.")


NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("r", True, InvalidValueError, "r must be an integer, not True (bool)."),
    ("r", 4.5, InvalidValueError, "r must be an integer, not 4.5."),
    ("r", 4.0, InvalidValueError, "r must be an integer, not 4.0."),
    ("rank_pattern", {"q_proj": 4.0}, InvalidValueError, "rank_pattern['q_proj'] must be an integer, not 4.0."),
    ("r", 0, InvalidValueError, "r must be at least 1, not 0."),
    ("r", "4", InvalidValueError, "r must be an integer, not '4' (str)."),
    ("lora_alpha", NAN, NonFiniteError, "lora_alpha is nan; it must be a finite number."),
    ("lora_alpha", INF, NonFiniteError, "lora_alpha is inf; it must be a finite number."),
    ("lora_alpha", True, InvalidValueError, "lora_alpha must be a number, not True (bool)."),
    ("lora_alpha", "16", InvalidValueError, "lora_alpha must be a number, not '16' (str)."),
    ("rank_pattern", {"q_proj": True}, InvalidValueError, "rank_pattern['q_proj'] must be an integer, not True"),
    ("rank_pattern", {"(((": 2}, InvalidValueError, "rank_pattern key '(((' is not a valid regular expression"),
    ("alpha_pattern", {"q_proj": NAN}, NonFiniteError, "alpha_pattern['q_proj'] is nan; it must be a finite"),
    ("alpha_pattern", {"q_proj": "high"}, InvalidValueError, "alpha_pattern['q_proj'] must be a number, not 'high'"),
    ("alpha_pattern", ["q_proj"], InvalidValueError, "alpha_pattern must be an object of module pattern -> value"),
    ("use_rslora", "false", InvalidValueError, "use_rslora must be true or false, not 'false' (str)."),
    ("use_dora", 1, InvalidValueError, "use_dora must be true or false, not 1 (int)."),
    ("lora_dropout", NAN, NonFiniteError, "lora_dropout is nan"),
    ("lora_dropout", 2, InvalidValueError, "lora_dropout must be in [0, 1], not 2."),
    ("bias", "sometimes", InvalidValueError, "bias must be 'none', 'all' or 'lora_only', not 'sometimes'."),
    ("layers_to_transform", [True], InvalidValueError, "layers_to_transform must be a layer index or a list"),
    ("layers_to_transform", "0", InvalidValueError, "layers_to_transform must be a layer index or a list"),
    ("layers_pattern", "layers", InvalidValueError, "layers_pattern is set without layers_to_transform"),
    ("task_type", "CHAT", InvalidValueError, "task_type 'CHAT' is not a PEFT task type"),
    ("target_modules", [1, 2], InvalidValueError, "target_modules must be a list of module names"),
    ("modules_to_save", ["((("], InvalidValueError, "modules_to_save entry '(((' is not a valid regular"),
    ("init_lora_weights", "magic", InvalidValueError, "init_lora_weights='magic' is not a value PEFT accepts."),
    # integers past float range: every use of them as a float overflowed (an internal error at the CLI)
    ("lora_alpha", 10**400, InvalidValueError, "lora_alpha is a 401-digit number, too large to compute with."),
    ("alpha_pattern", {"q_proj": -(10**400)}, InvalidValueError, "alpha_pattern['q_proj'] is a 401-digit number"),
    ("r", 10**400, InvalidValueError, "r is a 401-digit number, too large to compute with."),
]


@pytest.mark.parametrize(("key", "value", "exc", "message"), BAD_VALUES,
                         ids=[f"{k}={v!r}"[:60] for k, v, _, _ in BAD_VALUES])
def test_unusable_values_are_named(key, value, exc, message, qv, tmp_path):
    got = read_error(qv, tmp_path, exc, **{key: value})
    assert got.startswith(message), got
    assert "\n  fix: " in got or "PEFT refuses" in got or "PEFT accepts" in got or "must be" in got


def test_bad_value_at_the_cli_is_one_message_and_exit_2(qv, llama_base, tmp_path):
    path = edited(qv, tmp_path / "a", lora_alpha=NAN)
    for args in (["inspect", path], ["check", path, "--base", llama_base]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.output.count("lora_alpha is nan; it must be a finite number.") == 1, result.output


def test_huge_alpha_reads_but_cannot_be_folded(qv, llama_base, tmp_path):
    path = edited(qv, tmp_path / "a", lora_alpha=1e300)
    adapter = read_adapter(path)
    with pytest.raises(MergeError, match=r"gives \d+ NaN/Inf value\(s\)"):
        merge_into(BaseCheckpoint.open(llama_base), [adapter])


def test_rank_in_config_far_from_the_tensors_is_a_check_error(qv, llama_base, tmp_path):
    from adapterhub.compose.checks import check_adapter

    adapter = read_adapter(edited(qv, tmp_path / "a", r=10**30))
    report = check_adapter(adapter, BaseCheckpoint.open(llama_base))
    assert {p.code for p in report.errors} == {"rank"}


def test_ia3_and_prefix_values(llama_base, make_peft, tmp_path):
    ia3 = make_peft(llama_base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert "feedforward_modules ['up_proj'] are not in target_modules" in read_error(
        ia3, tmp_path, InvalidValueError, feedforward_modules=["down_proj", "up_proj"])
    assert "init_ia3_weights must be true or false" in read_error(ia3, tmp_path, InvalidValueError,
                                                                 init_ia3_weights="yes")
    prefix = make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert read_error(prefix, tmp_path, InvalidValueError, num_virtual_tokens=True).startswith(
        "num_virtual_tokens must be an integer, not True (bool).")
    assert "encoder-decoder" in read_error(prefix, tmp_path, UnsupportedAdapterError, num_transformer_submodules=2)
    assert "a_new_field" in read_error(prefix, tmp_path, UnsupportedAdapterError, a_new_field=[1])


def test_targets_peft_cannot_adapt_are_refused(qv, llama_base, tmp_path):
    """A regex matching everything (or a container such as self_attn) makes PEFT try to wrap a non-layer
    module, and it refuses to load; so do we, at read time (containers) or in check (norms)."""
    from adapterhub.compose.checks import check_adapter

    for target in (".*", ["self_attn", "q_proj", "v_proj"], r"model\.layers\.\d\.self_attn.*"):
        path = edited(qv, tmp_path / f"t{len(list(tmp_path.iterdir()))}", target_modules=target)
        with pytest.raises(ValueError, match="is not supported"):
            PeftModel.from_pretrained(load_base(llama_base), path)
        with pytest.raises(InvalidValueError, match=r"a module that contains others \(PEFT can only adapt layers"):
            read_adapter(path)
    norms = edited(qv, tmp_path / "norms", target_modules=r".*(q_proj|v_proj|input_layernorm)")
    with pytest.raises(ValueError, match="is not supported"):
        PeftModel.from_pretrained(load_base(llama_base), norms)
    report = check_adapter(read_adapter(norms), BaseCheckpoint.open(llama_base))
    assert [(p.code, p.where) for p in report.errors] == [("target-unsupported", "model.layers.0.input_layernorm")]


@pytest.mark.parametrize(("init", "error"), [(True, False), ("gaussian", False), (False, True),
                                             ("orthogonal", True)])
def test_targets_without_weights_are_a_no_op_or_refused(init, error, qv, llama_base, tmp_path):
    """Modules the config targets but the weights lack keep PEFT's initial values: B = 0 (no change, equal to
    PEFT) unless the initialisation is random, which nobody can reproduce."""
    from adapterhub.compose.checks import check_adapter

    path = edited(qv, tmp_path / "a", target_modules=["q_proj", "v_proj", "k_proj"], init_lora_weights=init)
    report = check_adapter(read_adapter(path), BaseCheckpoint.open(llama_base))
    if not error:
        assert report.ok and max_diff_vs_peft(llama_base, path) <= 1e-6
        return
    assert [(p.code, p.where) for p in report.errors] == [("target-without-weights", "model.layers.0.self_attn.k_proj")]
    assert f"with init_lora_weights={init!r} PEFT gives them random initial weights" in report.errors[0].message


# --- re-verification of issue 10 (attack pass): weights a config switches off, names PEFT does not match ----------


@pytest.mark.parametrize(("flag", "tensor"), [("use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_B.bias")])
def test_variant_weights_the_config_switches_off_are_not_applied(flag, tensor, minilm_dir, tmp_path):
    """A DoRA (or lora_bias) adapter whose config was edited to use_dora=false (lora_bias=false): PEFT builds plain
    LoRA layers and drops the magnitudes (biases) as unexpected keys. We applied them (MiniLM: 0.76 and 7.05 off)."""
    from peft import get_peft_model

    model = get_peft_model(load_base(minilm_dir), LoraConfig(r=4, target_modules=["query", "value"], **{flag: True}))
    g = torch.Generator().manual_seed(37)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(tmp_path / "saved")
    path = edited(tmp_path / "saved", tmp_path / "edited", **{flag: False})
    adapter = read_adapter(path)
    assert not any(n.endswith(tensor) for n in adapter.tensors)
    assert sum(n.endswith(tensor) for n in adapter.extra["ignored"]) == 12
    assert max_diff_vs_peft(minilm_dir, path) <= 1e-6


def test_weights_without_peft_name_prefix_are_refused(qv, llama_base, tmp_path):
    """PEFT matches saved weights to its modules by the full name: without 'base_model.model.' it loads none of
    them and the merged model is the base. We folded them all (0.08 off); now the directory is refused."""
    from safetensors.torch import load_file, save_file

    path = edited(qv, tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}, weights)
    base = load_base(llama_base).state_dict()
    theirs = peft_state(llama_base, path)
    assert all(torch.equal(theirs[k], base[k]) for k in base)  # the oracle: PEFT applied nothing
    with pytest.raises(CorruptFileError) as info:
        read_adapter(path)
    assert str(info.value) == (
        f"{path}: 8 of 8 weight(s) lack PEFT's 'base_model.model.' name prefix (e.g. "
        "'model.layers.0.self_attn.q_proj.lora_A.weight'); PEFT loads none of them, so the adapter would apply nothing "
        "there.\n  fix: save the adapter with PEFT's save_pretrained, or rename each weight to "
        "'base_model.model.<name>'.")


def test_a_config_number_of_thousands_of_digits_is_a_json_error(qv, tmp_path):
    path = edited(qv, tmp_path / "a")
    text = (path / "adapter_config.json").read_text()
    (path / "adapter_config.json").write_text(text.replace('"lora_alpha": 8', '"lora_alpha": ' + "9" * 5000))
    assert "9" * 5000 in (path / "adapter_config.json").read_text()
    with pytest.raises(CorruptFileError) as info:
        read_adapter(path)
    assert str(info.value).startswith(f"{path / 'adapter_config.json'} is not valid JSON (Exceeds the limit (4300 "
                                      "digits) for integer string conversion")
