"""A quantized base (GPTQ, AWQ, bitsandbytes) gets one clear explanation from check and export, not a list of
missing modules. The checkpoints are built here with the tensor names, dtypes and shapes those libraries write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_LLAMA
from peft import LoraConfig
from safetensors.torch import save_file

from adapterhub.base import BaseCheckpoint
from adapterhub.cli import cli
from adapterhub.compose.checks import check_adapter
from adapterhub.errors import CompatibilityError
from adapterhub.export import export_merged
from adapterhub.formats import read_adapter

HIDDEN, INTER, LAYERS, VOCAB, GROUP = 64, 128, 2, 128, 32
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (32, HIDDEN), "self_attn.v_proj": (32, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTER)}  # (out, in)


def _quantized_linear(scheme: str, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
    """One linear layer's tensors as each library serialises it (4-bit unless the name says 8)."""
    i32, f16 = torch.int32, torch.float16
    if scheme == "gptq":  # AutoGPTQ / optimum: packed along the input dimension
        return {"qweight": torch.zeros(in_f * 4 // 32, out_f, dtype=i32),
                "qzeros": torch.zeros(in_f // GROUP, out_f * 4 // 32, dtype=i32),
                "scales": torch.ones(in_f // GROUP, out_f, dtype=f16), "g_idx": torch.zeros(in_f, dtype=i32)}
    if scheme == "awq":  # AutoAWQ GEMM: packed along the output dimension
        return {"qweight": torch.zeros(in_f, out_f * 4 // 32, dtype=i32),
                "qzeros": torch.zeros(in_f // GROUP, out_f * 4 // 32, dtype=i32),
                "scales": torch.ones(in_f // GROUP, out_f, dtype=f16)}
    if scheme == "bnb-nf4":  # bitsandbytes Params4bit serialised by transformers
        n = out_f * in_f
        return {"weight": torch.zeros(n // 2, 1, dtype=torch.uint8), "weight.absmax": torch.ones(n // 64),
                "weight.quant_map": torch.linspace(-1, 1, 16),
                "weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b'{"quant_type": "nf4"}'),
                                                                     dtype=torch.uint8)}
    if scheme == "bnb-int8":  # bitsandbytes Int8Params: int8 rows and their scales
        return {"weight": torch.zeros(out_f, in_f, dtype=torch.int8), "SCB": torch.ones(out_f)}
    raise ValueError(scheme)


QUANT_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True},
    "bnb-nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": "bfloat16", "_load_in_4bit": True, "_load_in_8bit": False},
    "bnb-int8": None,  # an 8-bit checkpoint whose config lost quantization_config: found from its tensors
}


def quantized_base(root: Path, scheme: str) -> Path:
    tensors = {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.float16),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
               "lm_head.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.float16)}
    for layer in range(LAYERS):
        for name, (out_f, in_f) in LINEARS.items():
            for part, t in _quantized_linear(scheme, out_f, in_f).items():
                tensors[f"model.layers.{layer}.{name}.{part}"] = t
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
    path = root / scheme
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
              **TINY_LLAMA}
    if QUANT_CONFIGS[scheme]:
        config["quantization_config"] = QUANT_CONFIGS[scheme]
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def lora(llama_base, make_peft) -> Path:
    return make_peft(llama_base, LoraConfig(r=4, target_modules="all-linear"))


@pytest.mark.parametrize("scheme", sorted(QUANT_CONFIGS))
def test_check_explains_a_quantized_base(scheme, lora, tmp_path):
    base = BaseCheckpoint.open(quantized_base(tmp_path, scheme))
    report = check_adapter(read_adapter(lora), base)
    assert [p.code for p in report.problems] == ["base-quantized"], [p.line() for p in report.problems]
    message = report.errors[0].message
    method = {"gptq": "gptq, 4-bit", "awq": "awq, 4-bit", "bnb-nf4": "bitsandbytes, 4-bit",
              "bnb-int8": "bitsandbytes"}[scheme]
    assert message.startswith(f"this base checkpoint is quantized ({method}; ")
    assert "QLoRA" in report.errors[0].fix


def test_check_and_export_messages_for_a_gptq_base(lora, tmp_path):
    path = quantized_base(tmp_path, "gptq")
    result = CliRunner().invoke(cli, ["check", str(lora), "--base", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[0] == (
        f"error[base-quantized] {path}: this base checkpoint is quantized (gptq, 4-bit; config.json "
        "quantization_config): its weights are stored packed and scaled, so adapters are neither checked against "
        "them nor folded into them -> use the full-precision base the quantized model was made from: an adapter "
        "trained on a quantized base (QLoRA) applies to, and folds into, that full-precision model (pass its "
        "directory as --base)")
    assert "target-missing" not in result.output
    with pytest.raises(CompatibilityError) as info:
        export_merged(path, [read_adapter(lora)], tmp_path / "out")
    assert [p.code for p in info.value.report.errors] == ["base-quantized"]
    assert not (tmp_path / "out").exists()
    exported = CliRunner().invoke(cli, ["export", str(lora), "--base", str(path), "-o", str(tmp_path / "out")])
    assert exported.exit_code == 1 and "quantized (gptq, 4-bit" in exported.output
    assert "Traceback" not in exported.output and not (tmp_path / "out").exists()


def test_an_integer_weight_is_never_folded(llama_base, lora, tmp_path):
    """Without any quantization marker, a non-float weight is still refused (folding would round into int8)."""
    from safetensors import safe_open

    src = tmp_path / "int8"
    src.mkdir()
    (src / "config.json").write_text((Path(llama_base) / "config.json").read_text())
    with safe_open(str(Path(llama_base) / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64, dtype=torch.int8)
    save_file(tensors, str(src / "model.safetensors"))
    report = check_adapter(read_adapter(lora), BaseCheckpoint.open(src))
    assert [(p.code, p.where) for p in report.errors] == [("base-dtype", "model.layers.0.self_attn.q_proj")]
