"""The command line: output, --json, and exit codes (0 compatible, 1 incompatible, 2 unreadable)."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner
from conftest import ADAPTERS_LIB
from peft import LoraConfig

from adapterhub.cli import cli

LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_help_does_not_import_torch():
    code = "import sys; from adapterhub.cli import cli; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_inspect_text_and_json(llama_base, make_peft):
    src = make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"v_proj": 2}))
    result = run("inspect", src)
    assert result.exit_code == 0, result.output
    assert "kind        lora" in result.output
    assert "targets     4 modules (q_proj, v_proj)" in result.output
    assert "module ranks [2, 4]" in result.output and "scales [2.0, 4.0]" in result.output
    data = json.loads(run("inspect", src, "--json").output)
    assert data["format"] == "peft" and data["lora"]["ranks"] == [2, 4]
    assert data["num_parameters"] == 2 * (4 * 64 + 64 * 4) + 2 * (2 * 64 + 32 * 2)
    assert data["size_on_disk"] > data["tensor_bytes"]


def test_inspect_adapters_lib_bottleneck():
    result = run("inspect", ADAPTERS_LIB / "minilm_double_seq_bn")
    assert result.exit_code == 0, result.output
    assert "bottleneck  double_seq_bn, hidden 384, reduction 64, swish, 12 locations" in result.output


def test_check_exit_codes(llama_base, minilm_dir, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    ok = run("check", src, "--base", llama_base)
    assert ok.exit_code == 0 and "compatible (0 error(s)" in ok.output
    bad = run("check", src, "--base", minilm_dir)
    assert bad.exit_code == 1
    assert "error[target-missing] model.layers.0.self_attn.q_proj: no weight of this module" in bad.output
    data = json.loads(run("check", src, "--base", minilm_dir, "--json").output)
    assert data["compatible"] is False and {p["code"] for p in data["problems"] if p["severity"] == "error"} == {
        "target-missing"}
    missing = run("check", tmp_path / "nope", "--base", llama_base)
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("check", empty, "--base", llama_base).exit_code == 2
    assert run("check", src, "--base", empty).exit_code == 2


def test_check_refuses_pickles_with_exit_2():
    result = run("check", ADAPTERS_LIB / "llama_seq_bn_bin", "--base", LLAMA_BASE)
    assert result.exit_code == 2 and "--allow-pickle" in result.output
    allowed = run("check", ADAPTERS_LIB / "llama_seq_bn_bin", "--base", LLAMA_BASE, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output


def test_convert_records_fingerprint_and_refuses_incompatible(llama_base, minilm_dir, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    out = tmp_path / "converted"
    result = run("convert", src, "-o", out, "--format", "adapterhub", "--base", llama_base)
    assert result.exit_code == 0, result.output
    assert json.loads(run("inspect", out, "--json").output)["base"]["fingerprint"].startswith("fp1:")
    refused = run("convert", src, "-o", tmp_path / "bad", "--base", minilm_dir)
    assert refused.exit_code == 1 and "target-missing" in refused.output
    assert not (tmp_path / "bad").exists()
    again = run("convert", src, "-o", out, "--format", "adapterhub")
    assert again.exit_code == 2 and "--force" in again.output


def test_damaged_input_gives_a_message_not_a_traceback(llama_base, make_peft, tmp_path):
    import shutil

    src = tmp_path / "damaged"
    shutil.copytree(make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"])), src)
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    for args in (("inspect", src), ("check", src, "--base", llama_base)):
        result = run(*args)
        assert result.exit_code == 2
        assert "error:" in result.output and "truncated" in result.output
        assert "Traceback" not in result.output
    lying = tmp_path / "lying-base"
    shutil.copytree(llama_base, lying)
    data = bytearray((lying / "model.safetensors").read_bytes())
    data[8:9] = b" "  # break the header's JSON
    (lying / "model.safetensors").write_bytes(bytes(data))
    result = run("check", ADAPTERS_LIB / "llama_lora", "--base", lying)
    assert result.exit_code == 2 and "model.safetensors" in result.output and "Traceback" not in result.output
