"""Directories we write in the `adapters` library format load in the real library and compute what PEFT does.

The library runs in its own environment (.venv-adapters, transformers ~=4.57; scripts/setup_adapters_env.sh)
through tests/fixtures/check_adapters_lib_load.py, which fails on any missing or unexpected key.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS_LIB, FIXTURES, load_base, peft_outputs
from peft import LoraConfig
from safetensors.torch import save_file

from adapterhub.adapter import Tensors
from adapterhub.compose.blend import blend
from adapterhub.convert import convert_adapter
from adapterhub.formats import read_adapter, write_adapter
from adapterhub.formats.adapters_lib import prefix_values

ROOT = Path(__file__).resolve().parent.parent
ORACLE_PYTHON = ROOT / ".venv-adapters" / "bin" / "python"
LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"

if not ORACLE_PYTHON.exists():
    if os.environ.get("ADAPTERHUB_REQUIRE_ADAPTERS_ORACLE"):
        raise RuntimeError(f"{ORACLE_PYTHON} is missing: run scripts/setup_adapters_env.sh")
    pytest.skip("the `adapters` library environment is not set up (scripts/setup_adapters_env.sh)",
                allow_module_level=True)


def run_oracle(adapter_dir: Path, base: str, reference: Path) -> str:
    proc = subprocess.run([str(ORACLE_PYTHON), str(FIXTURES / "check_adapters_lib_load.py"), str(adapter_dir), base,
                           str(reference)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def peft_reference(base_dir: Path, adapter_dir: Path, out: Path, key: str) -> Path:
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = load_base(base_dir)(input_ids=ids)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids),
               key: peft_outputs(base_dir, adapter_dir, ids).contiguous(),
               "base_output": getattr(plain, key).contiguous()}, out)
    return out


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["up_proj"], ["down_proj"],
                                     ["k_proj", "up_proj", "down_proj"]])
def test_peft_lora_written_as_adapters_lib_matches_peft(targets, make_peft, tmp_path):
    """Including the library's Llama quirk: 'intermediate' LoRA sits on down_proj, 'output' on up_proj."""
    src = make_peft(LLAMA_BASE, LoraConfig(r=4, lora_alpha=16, target_modules=targets), seed=7)
    out, _ = convert_adapter(src, tmp_path / "lib", format="adapters", base=LLAMA_BASE)
    ref = peft_reference(LLAMA_BASE, src, tmp_path / "ref.safetensors", "logits")
    assert "OK" in run_oracle(out, "llama", ref)


def test_rslora_written_as_adapters_lib_matches_peft(make_peft, tmp_path, minilm_dir):
    src = make_peft(minilm_dir, LoraConfig(r=8, lora_alpha=4, use_rslora=True,
                                           target_modules=["query", "value", "intermediate.dense"]), seed=8)
    out, _ = convert_adapter(src, tmp_path / "lib", format="adapters", base=minilm_dir)
    ref = peft_reference(minilm_dir, src, tmp_path / "ref.safetensors", "last_hidden_state")
    assert "OK" in run_oracle(out, "minilm", ref)


@pytest.mark.parametrize("name", ["minilm_seq_bn", "minilm_double_seq_bn", "llama_seq_bn", "llama_double_seq_bn",
                                  "minilm_lora", "llama_prefix_tuning_flat_safetensors"])
def test_rewritten_library_adapters_still_load(name, tmp_path):
    """Through our native format and back: the library loads the result and reproduces its own output."""
    native = write_adapter(read_adapter(ADAPTERS_LIB / name), tmp_path / "native", format="adapterhub")
    out = write_adapter(read_adapter(native), tmp_path / "lib", format="adapters")
    run_oracle(out, name.split("_", 1)[0], ADAPTERS_LIB / f"{name}.reference.safetensors")


@pytest.mark.parametrize("name", ["minilm_seq_bn", "llama_double_seq_bn", "llama_prefix_tuning_flat_safetensors"])
def test_bottleneck_and_flat_prefix_blends_equal_the_librarys_average_adapter(name, tmp_path):
    """Weights (0.7, 0.9) do not sum to 1: the library normalises them by default (average_adapter), and so do we."""
    a = read_adapter(ADAPTERS_LIB / name)
    g = torch.Generator().manual_seed(9)
    b = a.replace(tensors=Tensors({n: a.tensors[n] + (torch.randn(a.tensors.shape(n), generator=g) * 0.1).to(
        a.tensors[n].dtype) for n in a.tensors}))
    b_dir = write_adapter(b, tmp_path / "b", format="adapters")
    proc = subprocess.run([str(ORACLE_PYTHON), str(FIXTURES / "adapters_lib_average.py"), name.split("_", 1)[0],
                           str(tmp_path / "avg"), "0.7", "0.9", str(ADAPTERS_LIB / name), str(b_dir)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    theirs = read_adapter(tmp_path / "avg", allow_pickle=True)  # written just now by the library itself
    ours = blend([a, read_adapter(b_dir)], [0.7, 0.9])
    if a.kind == "prefix":
        torch.testing.assert_close(ours.tensors["prompt_embeddings"], prefix_values(theirs), rtol=1e-6, atol=1e-6)
        return
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    for n in ours.tensors:
        torch.testing.assert_close(ours.tensors[n], theirs.tensors[n], rtol=1e-6, atol=1e-6, msg=n)
