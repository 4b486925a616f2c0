"""`adapters` library directories: fixtures made by the real library (tests/fixtures/make_adapters_lib_fixtures.py).

Round trips are bit-identical; converting its LoRA and prefixes to PEFT reproduces the library's own
recorded outputs when PEFT runs them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ADAPTERS_LIB, load_base, peft_outputs
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from adapterhub.convert import convert_adapter
from adapterhub.errors import CorruptFileError, PickleRefusedError, UnsupportedAdapterError
from adapterhub.formats import adapters_lib, detect, read_adapter, write_adapter

SAFETENSORS_FIXTURES = sorted(p.name for p in ADAPTERS_LIB.iterdir()
                              if p.is_dir() and (p / "adapter.safetensors").is_file())
LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"


def reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(ADAPTERS_LIB / f"{name}.reference.safetensors")


def test_fixture_set_is_complete():
    kinds = {(n.split("_", 1)[0], read_adapter(ADAPTERS_LIB / n).kind) for n in SAFETENSORS_FIXTURES}
    assert {("minilm", "bottleneck"), ("minilm", "lora"), ("minilm", "prefix"),
            ("llama", "bottleneck"), ("llama", "lora"), ("llama", "prefix")} <= kinds


@pytest.mark.parametrize("name", SAFETENSORS_FIXTURES)
def test_roundtrip_is_bit_identical(name, tmp_path):
    src = ADAPTERS_LIB / name
    assert detect(src) == "adapters"
    first = read_adapter(src)
    out = write_adapter(first, tmp_path / "out", format="adapters")
    second = read_adapter(out)
    assert (first.kind, first.spec, first.base, first.name) == (second.kind, second.spec, second.base, second.name)
    assert sorted(first.tensors) == sorted(second.tensors)
    for n in first.tensors:
        assert torch.equal(first.tensors[n], second.tensors[n]) and first.tensors.dtype(n) == second.tensors.dtype(n)
    # the library's own files: same document, same keys (adapter name included), same tensors
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (src / "adapter_config.json").read_text())
    ours, theirs = load_file(out / "adapter.safetensors"), load_file(src / "adapter.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bottleneck_specs():
    pfeiffer = read_adapter(ADAPTERS_LIB / "minilm_seq_bn")
    houlsby = read_adapter(ADAPTERS_LIB / "minilm_double_seq_bn")
    assert (pfeiffer.kind, pfeiffer.spec.architecture, pfeiffer.spec.hidden_size) == ("bottleneck", "seq_bn", 384)
    assert houlsby.spec.architecture == "double_seq_bn"
    assert pfeiffer.spec.reduction_factor == 16
    # canonical names drop the adapter's name; locations stay the model's
    assert "encoder.layer.0.output.adapters.adapter_down.0.weight" in pfeiffer.tensors
    assert "encoder.layer.0.attention.output.adapters.adapter_up.weight" in houlsby.tensors


def _assert_close_to_reference(got: torch.Tensor, ref: dict[str, torch.Tensor], key: str) -> None:
    want = ref[key]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(want, ref["base_output"], atol=1e-3), "the reference must differ from the base"


def test_minilm_lora_converted_to_peft_matches_the_library(real_minilm_dir, tmp_path):
    minilm_dir = real_minilm_dir  # the reference outputs were recorded on MiniLM's real weights
    out, _ = convert_adapter(ADAPTERS_LIB / "minilm_lora_all", tmp_path / "peft", format="peft", base=minilm_dir)
    assert detect(out) == "peft"
    ref = reference("minilm_lora_all")
    _assert_close_to_reference(peft_outputs(minilm_dir, out, ref["input_ids"]), ref, "last_hidden_state")


def test_llama_lora_converted_to_peft_matches_the_library(tmp_path):
    out, _ = convert_adapter(ADAPTERS_LIB / "llama_lora_all", tmp_path / "peft", format="peft", base=LLAMA_BASE)
    ref = reference("llama_lora_all")
    _assert_close_to_reference(peft_outputs(LLAMA_BASE, out, ref["input_ids"]), ref, "logits")


@pytest.mark.parametrize("name", ["llama_prefix_tuning_flat_safetensors", "llama_prefix_tuning_safetensors"])
def test_llama_prefix_converted_to_peft_matches_the_library(name, tmp_path):
    """Flat and MLP-parameterised prefixes (GQA: 2 kv-heads) become PEFT prompt_embeddings."""
    adapter = read_adapter(ADAPTERS_LIB / name)
    assert adapter.spec.layout == ("adapters_flat" if "flat" in name else "adapters_mlp")
    out, _ = convert_adapter(ADAPTERS_LIB / name, tmp_path / "peft", format="peft", base=LLAMA_BASE)
    converted = read_adapter(out)
    assert (converted.spec.num_layers, converted.spec.num_kv_heads, converted.spec.token_dim) == (2, 2, 32)
    ref = reference(name)
    # the values equal the key/values the library computes (layers x kv x heads x tokens x head_dim)
    kv = ref["prefix_key_values.self_prefix"]
    assert kv.shape == (2, 2, 2, 10, 16)
    mine = converted.tensors["prompt_embeddings"].view(10, 4, 2, 16).permute(1, 2, 0, 3)
    assert torch.allclose(mine, kv.reshape(4, 2, 10, 16), atol=1e-6)
    # PEFT numbers the real tokens from num_virtual_tokens (they follow the prefix in its KV cache), the
    # library from 0; PEFT adds num_virtual_tokens to given position_ids, so undo that to compare.
    ids = ref["input_ids"]
    positions = (torch.arange(ids.shape[1]) - 10).expand(ids.shape[0], -1)
    _assert_close_to_reference(peft_outputs(LLAMA_BASE, out, ids, position_ids=positions), ref, "logits")
    # with PEFT's own position convention the outputs differ: the libraries disagree, not the values
    assert not torch.allclose(peft_outputs(LLAMA_BASE, out, ids), ref["logits"], atol=1e-3)


def test_prefix_to_peft_needs_the_base(tmp_path):
    with pytest.raises(UnsupportedAdapterError, match="pass --base"):
        convert_adapter(ADAPTERS_LIB / "llama_prefix_tuning_flat_safetensors", tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


def test_peft_lora_to_adapters_and_back(llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj",
                                                                              "down_proj"]), seed=2)
    out, _ = convert_adapter(src, tmp_path / "lib", format="adapters", base=llama_base)
    doc = json.loads((out / "adapter_config.json").read_text())
    assert doc["config"]["attn_matrices"] == ["q", "v"]
    assert doc["config"]["intermediate_lora"] and doc["config"]["output_lora"]
    assert doc["model_class"] == "LlamaForCausalLM" and doc["hidden_size"] == 64
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.loras.adapter.lora_A" in f.keys()
    a, b = read_adapter(src), read_adapter(out)
    assert sorted(a.tensors) == sorted(b.tensors)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert all(a.spec.scale(m) == b.spec.scale(m) for m in a.modules())
    # and back to PEFT: PEFT computes the same outputs as with the original
    back, _ = convert_adapter(out, tmp_path / "back", format="peft", base=llama_base)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(peft_outputs(llama_base, src, ids), peft_outputs(llama_base, back, ids), atol=1e-6)


def test_rank_patterns_cannot_become_adapters_lib_lora(llama_base, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    with pytest.raises(UnsupportedAdapterError, match="one r and alpha"):
        write_adapter(read_adapter(src), tmp_path / "x", format="adapters")
    assert not (tmp_path / "x").exists()


def test_peft_prefix_to_adapters_flat_prefix(llama_base, make_peft, tmp_path):
    from peft import PrefixTuningConfig

    src = make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    out, _ = convert_adapter(src, tmp_path / "lib", format="adapters", base=llama_base)
    lib = read_adapter(out)
    assert lib.spec.layout == "adapters_flat"
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        assert list(f.keys()) == ["model.prefix_tuning.prefix_tunings.adapter.self_prefix.control_trans"]
    assert torch.equal(adapters_lib.prefix_values(lib), read_adapter(src).tensors["prompt_embeddings"])


def test_pickle_fixture_refused_by_default_and_equal_when_allowed():
    with pytest.raises(PickleRefusedError, match="pytorch_adapter.bin"):
        read_adapter(ADAPTERS_LIB / "llama_seq_bn_bin")
    pickled = read_adapter(ADAPTERS_LIB / "llama_seq_bn_bin", allow_pickle=True)
    safe = read_adapter(ADAPTERS_LIB / "llama_seq_bn")
    assert sorted(pickled.tensors) == sorted(safe.tensors)
    assert all(torch.equal(pickled.tensors[n], safe.tensors[n]) for n in safe.tensors)


def test_pickled_prefix_drops_the_librarys_aliases():
    adapter = read_adapter(ADAPTERS_LIB / "llama_prefix_tuning", allow_pickle=True)
    safe = read_adapter(ADAPTERS_LIB / "llama_prefix_tuning_safetensors")
    assert sorted(adapter.tensors) == sorted(safe.tensors)


def test_adapter_name_mismatch_in_keys(tmp_path):
    src = tmp_path / "renamed"
    shutil.copytree(ADAPTERS_LIB / "minilm_seq_bn", src)
    doc = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**doc, "name": "other"}))
    with pytest.raises(CorruptFileError, match="does not name adapter 'other'"):
        read_adapter(src)


def test_unknown_config_schema(tmp_path):
    from adapterhub.errors import UnknownFormatError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UnknownFormatError, match="neither a PEFT config"):
        read_adapter(tmp_path)


def test_llama_base_fixture_loads_in_transformers():
    model = load_base(LLAMA_BASE)
    assert model.config.num_key_value_heads == 2
