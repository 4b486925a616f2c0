"""`adapterhub check --for vllm`: what vLLM 0.33.0's LoRA loader refuses (rank above --max-lora-rank, DoRA, LoRA
bias, adapter bias, modules_to_save, base-rewriting inits, non-LoRA kinds, non-PEFT directories), one line per
problem; and the `pull --format peft` output it accepts.

vLLM itself cannot run here (it needs a GPU); the rules are those of its source (see adapterhub/compose/vllm.py).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import ADAPTERS_LIB, FIXTURES
from peft import IA3Config, LoraConfig, PrefixTuningConfig
from safetensors import safe_open

from adapterhub.cli import cli
from adapterhub.compose.vllm import VLLM_MAX_LORA_RANKS, check_vllm
from adapterhub.errors import VllmOptionError
from adapterhub.formats import read_adapter
from adapterhub.registry import Registry

LLAMA = ADAPTERS_LIB / "tiny_llama_base"
QV = ["q_proj", "v_proj"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(make_peft):
    def mk(cfg, seed=0):
        return make_peft(LLAMA, cfg, seed)

    return {
        "r8": mk(LoraConfig(r=8, lora_alpha=16, target_modules=QV)),
        "r32": mk(LoraConfig(r=32, lora_alpha=16, target_modules=QV)),
        "pattern": mk(LoraConfig(r=8, lora_alpha=16, target_modules=QV, rank_pattern={"v_proj": 20})),
        "dora": mk(LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_dora=True)),
        "lora_bias": mk(LoraConfig(r=4, lora_alpha=8, target_modules=QV, lora_bias=True)),
        "bias": mk(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], bias="all")),
        "saved": mk(LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"])),
        "pissa": mk(LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="pissa")),
        "everything": mk(LoraConfig(r=64, lora_alpha=8, target_modules=QV, use_dora=True,
                                    modules_to_save=["lm_head"])),
        "ia3": mk(IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
        "prefix": mk(PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    }


def codes(report):
    return [p.code for p in report.errors]


def test_a_plain_lora_passes_and_rank_is_checked_against_max_lora_rank(made):
    assert check_vllm(read_adapter(made["r8"])).ok
    big = read_adapter(made["r32"])
    report = check_vllm(big)
    assert codes(report) == ["vllm-rank"]
    assert report.errors[0].line() == (
        "error[vllm-rank] r: LoRA rank 32 is greater than max_lora_rank 16 -> start vLLM with --max-lora-rank 32, "
        "or `adapterhub blend SRC --method svd --rank 16 -o OUT` for a lower-rank copy")
    assert check_vllm(big, max_lora_rank=32).ok and not check_vllm(big, max_lora_rank=8).ok
    # vLLM takes the largest of r and every rank_pattern value
    assert codes(check_vllm(read_adapter(made["pattern"]))) == ["vllm-rank"]
    assert check_vllm(read_adapter(made["pattern"]), max_lora_rank=32).ok


@pytest.mark.parametrize(("name", "code"), [("dora", "vllm-dora"), ("lora_bias", "vllm-lora-bias"),
                                            ("bias", "vllm-bias"), ("saved", "vllm-modules-to-save"),
                                            ("ia3", "vllm-kind"), ("prefix", "vllm-kind")])
def test_what_vllm_refuses_is_one_error_each(made, name, code):
    assert codes(check_vllm(read_adapter(made[name]))) == [code]


def test_base_rewriting_inits_are_refused(made):
    """PiSSA & co: the PEFT reader refuses the directory already (exit 2, with the fix); an adapter whose config
    says so in memory gets vllm-init."""
    r = run("check", made["pissa"], "--for", "vllm")
    assert r.exit_code == 2 and "init_lora_weights='pissa'" in r.output and "fix:" in r.output
    plain = read_adapter(made["r8"])
    pissa = plain.replace(extra={**plain.extra, "peft": {**plain.extra["peft"], "init_lora_weights": "pissa"}})
    assert codes(check_vllm(pissa)) == ["vllm-init"]


def test_one_line_per_problem_on_the_command_line(made):
    r = run("check", made["everything"], "--for", "vllm")
    assert r.exit_code == 1, r.output
    lines = r.output.splitlines()
    assert [line.split("]")[0] for line in lines[:-1]] == ["error[vllm-rank", "error[vllm-dora",
                                                          "error[vllm-modules-to-save"]
    assert lines[-1].endswith("vs vLLM 0.33.0 (--enable-lora --max-lora-rank 16): INCOMPATIBLE (3 error(s), "
                              "0 warning(s))")
    assert "greater than max_lora_rank 64" not in r.output
    r = run("check", made["everything"], "--for", "vllm", "--max-lora-rank", "64")
    assert r.exit_code == 1 and "vllm-rank" not in r.output and "2 error(s)" in r.output


def test_a_bottleneck_and_an_adapters_library_lora_are_refused_until_converted(tmp_path):
    report = check_vllm(read_adapter(ADAPTERS_LIB / "llama_seq_bn"))
    assert codes(report) == ["vllm-kind"] and "vLLM serves LoRA adapters only" in report.errors[0].message
    r = run("check", ADAPTERS_LIB / "llama_lora", "--for", "vllm")
    assert r.exit_code == 1 and "error[vllm-format] directory: written in the adapters format" in r.output
    assert run("convert", ADAPTERS_LIB / "llama_lora", "-o", tmp_path / "peft", "--format", "peft").exit_code == 0
    assert run("check", tmp_path / "peft", "--for", "vllm").exit_code == 0


def test_pull_format_peft_gives_what_vllm_reads(made, tmp_path):
    """The pulled directory holds what vLLM's loader opens (adapter_config.json with r / lora_alpha /
    target_modules, adapter_model.safetensors with base_model.model.*.lora_A/B.weight names) and passes."""
    reg = Registry(tmp_path / "reg")
    reg.push(made["r8"], "team/qv", base=LLAMA)
    out = tmp_path / "pulled"
    assert run("--registry", tmp_path / "reg", "pull", "team/qv", "-o", out, "--format", "peft").exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == QV
    assert config.get("use_dora") is False and config.get("bias") == "none" and not config.get("modules_to_save")
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith("base_model.model.") and n.endswith((".lora_A.weight", ".lora_B.weight"))
                         for n in names)
    r = run("check", out, "--for", "vllm", "--base", LLAMA)
    assert r.exit_code == 0, r.output
    assert r.output.count("compatible (0 error(s)") == 2  # the base report and the vLLM report


def test_options_are_checked(made):
    with pytest.raises(VllmOptionError, match="must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512, not 17"):
        check_vllm(read_adapter(made["r8"]), max_lora_rank=17)
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    r = run("check", made["r8"], "--for", "vllm", "--max-lora-rank", "17")
    assert r.exit_code == 2 and "'17' is not one of '1', '8', '16'" in r.output
    r = run("check", made["r8"])
    assert r.exit_code == 2 and "give --base BASE_DIR, --for vllm, or both" in r.output
    r = run("check", made["r8"], "--base", LLAMA, "--max-lora-rank", "32")
    assert r.exit_code == 2 and "--max-lora-rank goes with --for vllm" in r.output
    r = run("check", made["r32"], "--for", "vllm", "--json")
    assert r.exit_code == 1 and json.loads(r.output)["problems"][0]["code"] == "vllm-rank"
    r = run("check", FIXTURES / "nowhere", "--for", "vllm")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_nan_weights_and_a_config_rank_the_tensors_disagree_with_are_errors(made, tmp_path):
    """Both passed `check --for vllm` (vLLM loads them: it would serve NaN, or scale the tensors by alpha/r with
    the config's r, where PEFT refuses the adapter)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    nan, lied = tmp_path / "nan", tmp_path / "lied"
    shutil.copytree(made["r8"], nan)
    shutil.copytree(made["r8"], lied)
    sd = load_file(nan / "adapter_model.safetensors")
    name = sorted(sd)[0]
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = float("inf")
    save_file(sd, nan / "adapter_model.safetensors")
    config = json.loads((lied / "adapter_config.json").read_text())
    (lied / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    assert torch.isinf(load_file(nan / "adapter_model.safetensors")[name]).any()
    report = check_vllm(read_adapter(nan))
    assert codes(report) == ["vllm-non-finite"] and "(1 value)" in report.errors[0].message
    report = check_vllm(read_adapter(lied))
    assert set(codes(report)) == {"vllm-rank-mismatch"} and len(report.errors) == 4  # q and v of 2 layers
    assert "tensors have rank 8 but the config gives this module r=4" in report.errors[0].message
    for d in (nan, lied):
        r = run("check", d, "--for", "vllm")
        assert r.exit_code == 1 and "INCOMPATIBLE" in r.output, r.output
