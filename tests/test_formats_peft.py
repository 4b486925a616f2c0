"""PEFT directories: read -> write -> read is bit-identical, and what we write loads in PEFT unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import input_ids, load_base, make_llama, peft_outputs
from peft import IA3Config, LoraConfig, PrefixTuningConfig
from safetensors import safe_open

from adapterhub.adapter import LoraSpec
from adapterhub.errors import CorruptFileError, PickleRefusedError, UnsupportedAdapterError
from adapterhub.formats import detect, peft, read_adapter, write_adapter

LLAMA_CONFIGS = {
    "lora-patterns": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 16}, modules_to_save=["lm_head"]),
    "rslora": lambda: LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "embedding": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "lora-bias": lambda: LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["o_proj"]),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prefix-gqa": lambda: PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    "prefix-projection": lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM",
                                                    prefix_projection=True, encoder_hidden_size=16),
}


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_adapter(a, b) -> None:
    assert (a.kind, a.spec, a.base) == (b.kind, b.spec, b.base)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name], b.tensors[name]
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


def roundtrip(src: Path, tmp_path: Path, fmt: str = "peft"):
    first = read_adapter(src)
    out = write_adapter(first, tmp_path / "written", format=fmt)
    return first, out, read_adapter(out)


@pytest.fixture(scope="module", params=sorted(LLAMA_CONFIGS))
def llama_adapter(request, llama_base, make_peft) -> tuple[str, Path]:
    return request.param, make_peft(llama_base, LLAMA_CONFIGS[request.param](), seed=3)


def test_detects_peft(llama_adapter):
    assert detect(llama_adapter[1]) == "peft"


def test_roundtrip_is_bit_identical(llama_adapter, tmp_path):
    _, src = llama_adapter
    first, out, second = roundtrip(src, tmp_path)
    assert_same_adapter(first, second)
    # the files themselves: same config, same keys, same tensors as PEFT wrote them
    assert json.loads((out / peft.CONFIG_NAME).read_text()) == json.loads((src / peft.CONFIG_NAME).read_text())
    ours, theirs = file_tensors(out / peft.WEIGHTS_NAME), file_tensors(src / peft.WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # writing is deterministic, byte for byte
    again = write_adapter(second, tmp_path / "again")
    for name in (peft.CONFIG_NAME, peft.WEIGHTS_NAME):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_written_directory_gives_peft_identical_outputs(llama_adapter, llama_base, tmp_path):
    name, src = llama_adapter
    _, out, _ = roundtrip(src, tmp_path)
    ids = input_ids()
    expected = peft_outputs(llama_base, src, ids)
    got = peft_outputs(llama_base, out, ids)
    assert torch.equal(expected, got)
    with torch.no_grad():
        plain = load_base(llama_base)(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4), f"{name}: the adapter must change the outputs"


def test_kinds_and_flags(llama_base, make_peft):
    dora = read_adapter(make_peft(llama_base, LLAMA_CONFIGS["dora"]()))
    assert dora.kind == "lora" and dora.spec.use_dora
    assert all("lora_magnitude_vector" in dora.module_tensors(m) for m in dora.modules())
    patterns = read_adapter(make_peft(llama_base, LLAMA_CONFIGS["lora-patterns"]()))
    assert patterns.carried() == ["lm_head.weight"]
    assert patterns.spec.modules_to_save == ("lm_head",)
    emb = read_adapter(make_peft(llama_base, LLAMA_CONFIGS["embedding"]()))
    assert "lora_embedding_A" in emb.module_tensors("model.embed_tokens")
    prefix = read_adapter(make_peft(llama_base, LLAMA_CONFIGS["prefix-gqa"]()))
    # GQA: PEFT sizes the prefix by key/value heads (2 x 16), not attention heads (4 x 16)
    assert (prefix.spec.num_kv_heads, prefix.spec.token_dim, prefix.spec.width) == (2, 32, 2 * 2 * 32)


def test_scale_matches_peft_for_every_module(llama_base):
    """The one place a scale is computed agrees with what PEFT's layers use: patterns and rsLoRA."""
    from peft import get_peft_model

    configs = [
        LLAMA_CONFIGS["lora-patterns"](),
        LLAMA_CONFIGS["rslora"](),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                   rank_pattern={r"model\.layers\.0\..*proj": 2, "k_proj": 4},
                   alpha_pattern={"up_proj": 3, r"layers\.1\.self_attn\.(q|v)_proj": 5}),
    ]
    for config in configs:
        model = get_peft_model(load_base(llama_base), config)
        spec = LoraSpec(r=config.r, alpha=config.lora_alpha, use_rslora=config.use_rslora,
                        rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern)
        checked = 0
        for name, module in model.base_model.model.named_modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                assert spec.scale(name) == pytest.approx(module.scaling["default"], rel=1e-12), name
                assert spec.rank(name) == module.r["default"], name
                checked += 1
        assert checked >= 4


def test_gpt2_fan_in_fan_out_roundtrip_and_outputs(make_peft, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)).eval()
    base_dir = tmp_path / "gpt2"
    base.save_pretrained(base_dir)
    src = make_peft(base_dir, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    first, out, second = roundtrip(src, tmp_path)
    assert second.spec.fan_in_fan_out
    assert_same_adapter(first, second)
    ids = input_ids(100)
    assert torch.equal(peft_outputs(base_dir, src, ids), peft_outputs(base_dir, out, ids))


def test_minilm_lora_roundtrip_and_outputs(minilm_dir, make_peft, tmp_path):
    src = make_peft(minilm_dir, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), seed=5)
    first, out, second = roundtrip(src, tmp_path)
    assert_same_adapter(first, second)
    assert first.modules()[0] == "encoder.layer.0.attention.self.query"
    ids = input_ids(30522)
    assert torch.equal(peft_outputs(minilm_dir, src, ids), peft_outputs(minilm_dir, out, ids))


def test_native_format_roundtrip(llama_adapter, tmp_path):
    _, src = llama_adapter
    first = read_adapter(src)
    native = write_adapter(first, tmp_path / "native", format="adapterhub")
    assert detect(native) == "adapterhub"
    second = read_adapter(native)
    assert_same_adapter(first, second)
    # and back to PEFT: the same files PEFT wrote
    back = write_adapter(second, tmp_path / "back", format="peft")
    assert json.loads((back / peft.CONFIG_NAME).read_text()) == json.loads((src / peft.CONFIG_NAME).read_text())
    ours, theirs = file_tensors(back / peft.WEIGHTS_NAME), file_tensors(src / peft.WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


# --- bad input -------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pickle_refused_then_loaded_with_weights_only(llama_base, make_peft, tmp_path):
    src = _copy(make_peft(llama_base, LLAMA_CONFIGS["ia3"]()), tmp_path / "pk")
    tensors = file_tensors(src / peft.WEIGHTS_NAME)
    (src / peft.WEIGHTS_NAME).unlink()
    torch.save(tensors, src / "adapter_model.bin")
    with pytest.raises(PickleRefusedError, match="(?s)pickle file.*--allow-pickle"):
        read_adapter(src)
    adapter = read_adapter(src, allow_pickle=True)
    assert sorted(adapter.tensors) == sorted(n.replace("base_model.model.", "") for n in tensors)
    for key, value in tensors.items():
        assert torch.equal(adapter.tensors[key.replace("base_model.model.", "")], value)


class _Evil:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_malicious_pickle_is_not_executed(llama_base, make_peft, tmp_path, capsys):
    src = _copy(make_peft(llama_base, LLAMA_CONFIGS["ia3"]()), tmp_path / "evil")
    (src / peft.WEIGHTS_NAME).unlink()
    import pickle

    (src / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(CorruptFileError, match="weights_only=True"):
        read_adapter(src, allow_pickle=True)
    assert "would have run code" not in capsys.readouterr().out


def test_truncated_weights_file(llama_base, make_peft, tmp_path):
    src = _copy(make_peft(llama_base, LLAMA_CONFIGS["lora-patterns"]()), tmp_path / "trunc")
    data = (src / peft.WEIGHTS_NAME).read_bytes()
    (src / peft.WEIGHTS_NAME).write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_adapter(src)


def test_missing_half_of_a_lora_pair(llama_base, make_peft, tmp_path):
    from safetensors.torch import save_file

    src = _copy(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "half")
    tensors = file_tensors(src / peft.WEIGHTS_NAME)
    dropped = next(k for k in tensors if k.endswith("lora_B.weight"))
    del tensors[dropped]
    save_file(tensors, src / peft.WEIGHTS_NAME)
    with pytest.raises(CorruptFileError, match="has lora_A but no lora_B"):
        read_adapter(src)


def test_corrupt_config(llama_base, make_peft, tmp_path):
    src = _copy(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "cfg")
    (src / peft.CONFIG_NAME).write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        read_adapter(src)
    (src / peft.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8}))
    with pytest.raises(CorruptFileError, match="target_modules is null: PEFT would pick default targets"):
        read_adapter(src)


def test_unsupported_peft_types_are_named(llama_base, make_peft, tmp_path):
    src = _copy(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "x")
    cfg = json.loads((src / peft.CONFIG_NAME).read_text())
    (src / peft.CONFIG_NAME).write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(UnsupportedAdapterError, match="LOHA.*LORA, IA3, PREFIX_TUNING"):
        read_adapter(src)
    (src / peft.CONFIG_NAME).write_text(json.dumps({**cfg, "layer_replication": [[0, 2]]}))
    with pytest.raises(UnsupportedAdapterError, match="layer replication"):
        read_adapter(src)


def test_write_refuses_non_empty_target_and_leaves_it_alone(llama_base, make_peft, tmp_path):
    from adapterhub.errors import FormatError

    adapter = read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"])))
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FormatError, match="already exists and is not empty"):
        write_adapter(adapter, target)
    assert (target / "keep.txt").read_text() == "mine" and len(list(target.iterdir())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dir left behind"


def test_bottleneck_cannot_be_written_as_peft(tmp_path):
    from conftest import ADAPTERS_LIB

    adapter = read_adapter(ADAPTERS_LIB / "minilm_seq_bn")
    with pytest.raises(UnsupportedAdapterError, match="PEFT has no bottleneck adapters"):
        write_adapter(adapter, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


def test_llama_model_without_lm_head(make_peft, tmp_path):
    """An adapter made on a bare LlamaModel names modules without the 'model.' prefix."""
    model = make_llama(0, causal=False)
    src = make_peft(None, LoraConfig(r=2, target_modules=["q_proj"]), model=model)
    assert read_adapter(src).modules()[0] == "layers.0.self_attn.q_proj"
