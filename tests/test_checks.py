"""Compatibility checks against real checkpoints and adapters made by PEFT and the `adapters` library."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ADAPTERS_LIB, make_llama, save_model
from peft import IA3Config, LoraConfig, PrefixTuningConfig

from adapterhub.base import BaseCheckpoint
from adapterhub.compose.checks import check_adapter, check_composable, resolve_module
from adapterhub.convert import with_base
from adapterhub.errors import CompatibilityError
from adapterhub.formats import read_adapter, write_adapter

LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"


def codes(report) -> list[str]:
    return sorted({p.code for p in report.errors})


@pytest.fixture(scope="module")
def base(llama_base) -> BaseCheckpoint:
    return BaseCheckpoint.open(llama_base)


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """Same architecture, hidden 96 instead of 64."""
    return save_model(make_llama(0, hidden_size=96, num_attention_heads=4, num_key_value_heads=2),
                      tmp_path_factory.mktemp("wide") / "base")


def test_peft_lora_fits_its_base(base, llama_base, make_peft):
    adapter = read_adapter(make_peft(llama_base, LoraConfig(r=4, target_modules="all-linear",
                                                            modules_to_save=["lm_head"])))
    report = check_adapter(adapter, base)
    assert report.ok, [p.line() for p in report.problems]
    assert report.resolved["model.layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    assert report.resolved["lm_head.weight"] == "lm_head.weight"
    assert len(report.resolved) == 2 * 7 + 1


def test_wrong_shapes_are_reported_per_module(base, wide_base, make_peft):
    adapter = read_adapter(make_peft(wide_base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"])))
    report = check_adapter(adapter, base)
    assert not report.ok and codes(report) == ["shape"]
    lines = [p.line() for p in report.errors]
    assert any("model.layers.0.self_attn.q_proj: lora_A is (4, 96), expected (4, 64)" in line for line in lines)
    with pytest.raises(CompatibilityError, match="INCOMPATIBLE") as info:
        report.raise_for_errors()
    assert info.value.report is report


def test_prefix_tolerance_between_llama_model_and_causal_lm(base, make_peft):
    bare = make_llama(0, causal=False)
    adapter = read_adapter(make_peft(None, LoraConfig(r=2, target_modules=["q_proj"]), model=bare))
    assert adapter.modules()[0] == "layers.0.self_attn.q_proj"
    report = check_adapter(adapter, base)
    assert report.ok and report.resolved["layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"


def test_resolve_module_rules():
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
    assert resolve_module("base_model.model.model.layers.1.self_attn.q_proj", mods)[0] == mods[1]
    assert resolve_module("layers.0.self_attn.q_proj", mods)[0] == mods[0]
    assert resolve_module("model.layers.7.self_attn.q_proj", mods) == (None, [])
    # more than two missing leading parts is not a prefix difference: nothing matches
    assert resolve_module("self_attn.q_proj", mods) == (None, [])
    match, ties = resolve_module("attn.q", ["enc.attn.q", "dec.attn.q"])
    assert match is None and ties == ["dec.attn.q", "enc.attn.q"]


def test_other_base_detected_by_fingerprint(llama_base, llama_other, make_peft, tmp_path):
    own, other = BaseCheckpoint.open(llama_base), BaseCheckpoint.open(llama_other)
    adapter = with_base(read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"]))), own)
    # the fingerprint survives a trip through the PEFT format (safetensors metadata)
    adapter = read_adapter(write_adapter(adapter, tmp_path / "fp"))
    assert adapter.base.fingerprint == own.fingerprint()
    assert check_adapter(adapter, own).ok
    report = check_adapter(adapter, other)
    assert codes(report) == ["base-fingerprint"]
    assert "same architecture, different weights" in report.errors[0].message


def test_recorded_base_name_warns_or_fails(base, llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"]))
    dst = tmp_path / "named"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Other"}))
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(llama_base, ckpt_dir)
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    (ckpt_dir / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "meta-llama/Llama-tiny"}))
    adapter, ckpt = read_adapter(dst), BaseCheckpoint.open(ckpt_dir)
    report = check_adapter(adapter, ckpt)
    assert report.ok and [p.code for p in report.warnings] == ["base-name"]
    assert codes(check_adapter(adapter, ckpt, strict_identity=True)) == ["base-name"]


def test_rank_in_config_disagrees_with_tensors(base, llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    dst = tmp_path / "r"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    report = check_adapter(read_adapter(dst), base)
    assert codes(report) == ["rank"] and "config gives this module r=8" in report.errors[0].message


def test_composable_refuses_a_rank_that_disagrees_with_its_config(llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    dst = tmp_path / "r"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 2}}))
    report = check_composable([read_adapter(src), read_adapter(dst)])
    assert codes(report) == ["rank"] and "scale would be wrong" in report.errors[0].message


def test_ia3_vector_on_the_wrong_side(base, llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert check_adapter(read_adapter(src), base).ok
    dst = tmp_path / "ia3"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "feedforward_modules": []}))
    report = check_adapter(read_adapter(dst), base)
    assert codes(report) == ["ia3-vector"]
    assert "feedforward_modules in the config is wrong" in report.errors[0].fix


def test_prefix_for_a_model_without_gqa(base, tmp_path, make_peft):
    no_gqa = save_model(make_llama(0, num_key_value_heads=4), tmp_path / "mha")
    adapter = read_adapter(make_peft(no_gqa, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")))
    report = check_adapter(adapter, base)
    assert "prefix-kv-heads" in codes(report) and "prefix-width" in codes(report)
    assert check_adapter(adapter, BaseCheckpoint.open(no_gqa)).ok


def test_prefix_for_another_depth(base, tmp_path, make_peft):
    deeper = save_model(make_llama(0, num_hidden_layers=3), tmp_path / "deep")
    adapter = read_adapter(make_peft(deeper, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")))
    assert "prefix-layers" in codes(check_adapter(adapter, base))


def test_adapters_lib_fixtures_against_their_bases(minilm_dir):
    minilm, llama = BaseCheckpoint.open(minilm_dir), BaseCheckpoint.open(LLAMA_BASE)
    for d in sorted(ADAPTERS_LIB.iterdir()):
        if not (d / "adapter.safetensors").is_file():
            continue
        adapter = read_adapter(d)
        own, other = (minilm, llama) if d.name.startswith("minilm") else (llama, minilm)
        assert check_adapter(adapter, own).ok, (d.name, [p.line() for p in check_adapter(adapter, own).problems])
        assert not check_adapter(adapter, other).ok, d.name


def test_bottleneck_hidden_size_mismatch(minilm_dir):
    adapter = read_adapter(ADAPTERS_LIB / "llama_seq_bn")
    report = check_adapter(adapter, BaseCheckpoint.open(minilm_dir))
    assert "bottleneck-hidden" in codes(report)


# --- adapter vs adapter ----------------------------------------------------------------------------


def test_composable_loras_of_different_ranks(llama_base, make_peft):
    a = read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"])))
    b = read_adapter(make_peft(llama_base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), seed=1))
    assert check_composable([a, b]).ok


def test_not_composable(llama_base, wide_base, make_peft):
    lora = read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"])))
    ia3 = read_adapter(make_peft(llama_base, IA3Config(target_modules=["k_proj"], feedforward_modules=[])))
    wide = read_adapter(make_peft(wide_base, LoraConfig(r=2, target_modules=["q_proj"])))
    dora = read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)))
    assert codes(check_composable([lora, ia3])) == ["kind-mismatch"]
    assert codes(check_composable([lora, wide])) == ["shape"]
    assert codes(check_composable([lora, dora])) == ["dora"]


def test_prefix_lengths_blend_vs_stack(llama_base, make_peft):
    p4 = read_adapter(make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")))
    p6 = read_adapter(make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM")))
    assert codes(check_composable([p4, p6], mode="blend")) == ["prefix-length"]
    assert check_composable([p4, p6], mode="stack").ok


def test_bottlenecks_blend_but_do_not_stack():
    a = read_adapter(ADAPTERS_LIB / "minilm_seq_bn")
    b = read_adapter(ADAPTERS_LIB / "minilm_double_seq_bn")
    assert check_composable([a, a], mode="blend").ok
    assert codes(check_composable([a, b], mode="blend")) == ["bottleneck-config"]
    report = check_composable([a, a], mode="stack")
    assert codes(report) == ["bottleneck-stack"] and "only at run time" in report.errors[0].message


def test_composable_detects_different_bases_by_fingerprint(llama_base, llama_other, make_peft):
    a = with_base(read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"]))),
                  BaseCheckpoint.open(llama_base))
    b = with_base(read_adapter(make_peft(llama_other, LoraConfig(r=2, target_modules=["q_proj"]))),
                  BaseCheckpoint.open(llama_other))
    assert codes(check_composable([a, b])) == ["base-fingerprint"]


# --- architecture identity --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mistral_base(tmp_path_factory):
    """A tiny Mistral with the Llama fixture's sizes: the same module names and shapes, another architecture."""
    import torch
    from conftest import TINY_LLAMA
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY_LLAMA)).eval()
    return save_model(model, tmp_path_factory.mktemp("mistral") / "base")


def test_an_adapter_for_another_architecture_of_the_same_sizes_fails(base, llama_base, mistral_base, make_peft):
    mistral = BaseCheckpoint.open(mistral_base)
    assert sorted(mistral.modules) == sorted(base.modules)  # nothing but the recorded identity tells them apart
    llama_lora = read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    assert (llama_lora.base.model_type, llama_lora.base.architectures) == ("llama", ("LlamaForCausalLM",))
    assert check_adapter(llama_lora, base).ok
    report = check_adapter(llama_lora, mistral)
    assert codes(report) == ["base-architecture"]
    assert report.errors[0].message == "the adapter was made for a 'llama' model, the base is a 'mistral' model"
    mistral_lora = read_adapter(make_peft(mistral_base, LoraConfig(r=2, target_modules=["q_proj"])))
    assert codes(check_adapter(mistral_lora, base)) == ["base-architecture"]
    assert codes(check_composable([llama_lora, mistral_lora])) == ["base-architecture"]


def test_identity_recorded_by_convert_and_push_with_base(base, llama_base, mistral_base, make_peft, tmp_path):
    from adapterhub.registry import Registry

    # saved with a task type, PEFT records no model class: only --base can record the architecture
    src = make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    bare = read_adapter(src)
    assert bare.base.model_type is None and bare.base.architectures is None
    mistral = BaseCheckpoint.open(mistral_base)
    assert check_adapter(bare, mistral).ok  # nothing recorded: the check cannot tell
    for fmt in ("peft", "adapterhub", "adapters"):
        out = write_adapter(with_base(bare, base), tmp_path / fmt, format=fmt,
                            **({"hidden_size": 64} if fmt == "adapters" else {}))
        again = read_adapter(out)
        assert (again.base.model_type, again.base.architectures) == ("llama", ("LlamaForCausalLM",)), fmt
        assert codes(check_adapter(again, mistral)) == ["base-architecture"], fmt
    reg = Registry(tmp_path / "reg")
    pushed = reg.push(src, "team/qa", base=llama_base)
    assert pushed.manifest["base"]["model_type"] == "llama"
    assert pushed.manifest["base"]["architectures"] == ["LlamaForCausalLM"]
    assert codes(check_adapter(reg.load("team/qa"), mistral)) == ["base-architecture"]


def test_minilm_and_llama_adapters_refuse_each_others_base(base, llama_base, minilm_dir, make_peft):
    minilm = BaseCheckpoint.open(minilm_dir)
    bert_lora = read_adapter(make_peft(minilm_dir, LoraConfig(r=2, target_modules=["query", "value"])))
    llama_lora = read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    assert codes(check_adapter(bert_lora, base)) == ["base-architecture", "target-missing"]
    assert codes(check_adapter(llama_lora, minilm)) == ["base-architecture", "target-missing"]
    # the `adapters` library records the model class it was made with
    lib = read_adapter(ADAPTERS_LIB / "minilm_lora")
    assert (lib.base.model_type, lib.base.architectures) == ("bert", ("BertModel",))
    assert "base-architecture" in codes(check_adapter(lib, base))


def test_paths_are_never_mapped_onto_another_structure():
    base = ["model.decoder.layers.0.mlp.down_proj", "model.encoder.layers.0.mlp.down_proj", "lm_head"]
    # replacing the prefix `model.` with `model.decoder.` would put a decoder-only adapter on a decoder stack
    assert resolve_module("model.layers.0.mlp.down_proj", base) == (None, [])
    assert resolve_module("text_model.encoder.layers.0.q", ["vision_model.encoder.layers.0.q"]) == (None, [])
    # one-sided wrapper prefixes still resolve
    assert resolve_module("decoder.layers.0.mlp.down_proj", base)[0] == base[0]
    assert resolve_module("base_model.model.model.decoder.layers.0.mlp.down_proj", base)[0] == base[0]


def test_mixed_prefixes_mean_another_structure(base, llama_base, make_peft):
    import torch

    from adapterhub.adapter import Adapter, LoraSpec, Tensors

    t = {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 64),
         "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(64, 2),
         "layers.1.self_attn.q_proj.lora_A": torch.zeros(2, 64), "layers.1.self_attn.q_proj.lora_B": torch.zeros(64, 2)}
    mixed = Adapter(kind="lora", spec=LoraSpec(r=2, alpha=2), tensors=Tensors(t))
    report = check_adapter(mixed, base)
    assert codes(report) == ["target-structure"]
    assert "'' -> ''" in report.errors[0].message and "'' -> 'model.'" in report.errors[0].message
