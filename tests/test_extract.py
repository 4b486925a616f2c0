"""Full fine-tune -> LoRA extraction, against real oracles: PEFT reproduces the fine-tune from the extracted
adapter, and dense SVDs give the Eckart-Young optimum the errors are held to."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import input_ids, load_base, make_llama, save_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterhub import extraction
from adapterhub.cli import cli
from adapterhub.errors import (
    BaseCheckpointError,
    CheckpointMismatchError,
    ExtractError,
    NonFiniteWeightsError,
    NotAFineTuneError,
    OutputPathError,
    UnrepresentableChangeError,
)
from adapterhub.extraction import extract, save
from adapterhub.formats import read_adapter

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merged_finetune(base_dir: Path, out: Path, config: LoraConfig, *, seed: int = 0, scale: float = 0.2,
                    model=None, dtype: torch.dtype | None = None) -> Path:
    """base + a real PEFT LoRA with seeded weights, merged by PEFT's merge_and_unload and saved."""
    m = model if model is not None else load_base(base_dir)
    peft_model = get_peft_model(m, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_A" in name else 0.05 * scale))
    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    return save_model(merged, out)


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def peft_on_base(base_dir: Path, adapter_dir: Path, ids: torch.Tensor, *, resize: int | None = None) -> torch.Tensor:
    base = load_base(base_dir)
    if resize:
        base.resize_token_embeddings(resize)
    return outputs(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)


def deltas(base_dir: Path, tuned_dir: Path) -> dict[str, torch.Tensor]:
    b = load_file(str(base_dir / "model.safetensors"))
    t = load_file(str(tuned_dir / "model.safetensors"))
    return {n: t[n].float() - b[n].float() for n in b if n in t and t[n].shape == b[n].shape}


def factor_error(adapter_dir: Path, module: str, D: torch.Tensor) -> float:
    w = load_file(str(adapter_dir / "adapter_model.safetensors"))
    A = w[f"base_model.model.{module}.lora_A.weight"].float()
    B = w[f"base_model.model.{module}.lora_B.weight"].float()
    return float((D - B @ A).norm() / D.norm())


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama_ft(llama_base, tmp_path_factory) -> Path:
    """llama_base + a rank-4 LoRA on q/v/down, merged."""
    return merged_finetune(llama_base, tmp_path_factory.mktemp("ft") / "tuned",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


@pytest.fixture(scope="module")
def full_rank_ft(llama_base, tmp_path_factory) -> Path:
    """llama_base + a full-rank Gaussian change of every linear weight (nothing else)."""
    w = load_file(str(llama_base / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for n in w:
        if any(f".{k}." in n for k in LINEAR):
            w[n] = w[n] + torch.randn(w[n].shape, generator=g) * 0.002
    out = tmp_path_factory.mktemp("ft") / "full_rank"
    out.mkdir()
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((llama_base / "config.json").read_text())
    return out


# --- the oracles --------------------------------------------------------------------------------------


def test_lora_merged_into_llama_is_reproduced_by_peft(llama_base, llama_ft, tmp_path):
    result = extract(llama_base, llama_ft, rank=4)
    out = save(result, tmp_path / "lora")
    ids = input_ids()
    ref = outputs(load_base(llama_ft), ids)
    torch.testing.assert_close(peft_on_base(llama_base, out, ids), ref, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(outputs(load_base(llama_base), ids), ref, atol=1e-3)  # the fine-tune did change
    # only the changed modules are stored: no embedding, lm_head or norm copy
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    modules = {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                  "mlp.down_proj")}
    assert keys == {f"base_model.model.{m}.lora_{x}.weight" for m in modules for x in "AB"}
    assert set(result.modules) == modules and result.modules_to_save == []
    assert len(result.unchanged) == 21 - 6 and result.max_error < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["modules_to_save"]) == (4, 4, {}, None)


def test_target_selects_modules_and_names_the_changes_left_out(llama_base, llama_ft):
    result = extract(llama_base, llama_ft, rank=4, target=r"\.mlp\.")
    assert set(result.modules) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert sorted(result.not_extracted) == [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2)
                                            for m in "qv"]
    assert result.lineage()["not_extracted"] == result.not_extracted


def test_minilm_with_changed_norm_and_biases_is_reproduced_by_peft(minilm_dir, tmp_path):
    model = load_base(minilm_dir)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"])
    tuned = merged_finetune(minilm_dir, tmp_path / "tuned", cfg, model=model, seed=3)
    w = load_file(str(tuned / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for n in ("encoder.layer.0.output.LayerNorm.weight",  # a norm: modules_to_save
              "encoder.layer.1.attention.self.query.bias",  # bias of a LoRA'd layer: lora_B.bias
              "encoder.layer.2.attention.self.key.bias"):  # bias of a layer whose weight is unchanged
        w[n] = w[n] + torch.randn(w[n].shape, generator=g) * 0.01
    save_file(w, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    result = extract(minilm_dir, tuned, rank=8)
    out = save(result, tmp_path / "lora")
    ids = input_ids(vocab=1000)
    torch.testing.assert_close(peft_on_base(minilm_dir, out, ids), outputs(load_base(tuned), ids),
                               atol=5e-5, rtol=1e-5)
    assert result.modules_to_save == ["encoder.layer.0.output.LayerNorm"]
    assert result.modules["encoder.layer.2.attention.self.key"].method == "bias-only"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["modules_to_save"] == ["encoder.layer.0.output.LayerNorm"]
    assert config["rank_pattern"] == {r"encoder\.layer\.2\.attention\.self\.key": 1}
    # transformers 5 does not save the position_ids buffer that the shipped MiniLM has: said, not refused
    assert any("position_ids" in n for n in result.notes)


def test_full_rank_change_gives_the_eckart_young_error(llama_base, full_rank_ft, tmp_path):
    D = deltas(llama_base, full_rank_ft)
    for svd in ("auto", "dense"):  # auto: a sketch of 16 of 64 columns: dense is cheaper
        result = extract(llama_base, full_rank_ft, rank=8, svd=svd)
        out = save(result, tmp_path / svd)
        assert len(result.modules) == 14
        for m, rep in result.modules.items():
            d = D[f"{m}.weight"]
            s = torch.linalg.svdvals(d.double())
            optimum = float(s[8:].square().sum().sqrt() / s.square().sum().sqrt())
            assert rep.rank == 8 and rep.method == "dense"
            assert rep.error == pytest.approx(optimum, rel=1e-5), (m, svd, rep.error, optimum)
            assert factor_error(out, m, d) == pytest.approx(rep.error, rel=1e-4)  # measured, not estimated


@pytest.mark.parametrize("kind", ["rank16+noise", "gaussian", "power-law"])
def test_randomized_svd_is_within_one_percent_of_the_exact_truncation(tmp_path, kind):
    """256 x 256, 384 x 256 and 256 x 384 modules, where `auto` takes the randomized range finder:
    the change of the bench (rank 16 + noise), a full-rank Gaussian (flat spectrum, the slowest case)
    and a power-law spectrum; every module's error within 1% of the Eckart-Young optimum."""
    base = make_llama(0, hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=1)
    save_model(base, tmp_path / "base")
    w = load_file(str(tmp_path / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for n in list(w):
        if any(f".{k}." in n for k in LINEAR):
            m, k = w[n].shape
            if kind == "rank16+noise":
                change, noise = torch.randn(m, 16, generator=g) @ torch.randn(16, k, generator=g), torch.randn(m, k)
                change = change / change.norm() + noise / noise.norm() * 0.2
            elif kind == "gaussian":
                change = torch.randn(m, k, generator=g)
            else:
                U, _ = torch.linalg.qr(torch.randn(m, min(m, k), generator=g))
                V, _ = torch.linalg.qr(torch.randn(k, min(m, k), generator=g))
                change = (U * torch.arange(1, min(m, k) + 1) ** -0.5) @ V.T
            w[n] = w[n] + change * (0.01 * w[n].norm() / change.norm())
    (tmp_path / "tuned").mkdir()
    save_file(w, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "tuned" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    D = deltas(tmp_path / "base", tmp_path / "tuned")
    result = extract(tmp_path / "base", tmp_path / "tuned", rank=16)
    assert len(result.modules) == 7
    for m, rep in result.modules.items():
        s = torch.linalg.svdvals(D[f"{m}.weight"].double())
        optimum = float(s[16:].square().sum().sqrt() / s.square().sum().sqrt())
        assert rep.method == "randomized" and optimum * (1 - 1e-5) <= rep.error <= optimum * 1.01, \
            (m, rep.error, optimum)


@pytest.mark.parametrize("svd", ["randomized", "dense"])
def test_energy_and_max_error_choose_the_smallest_rank(llama_base, full_rank_ft, tmp_path, svd):
    D = deltas(llama_base, full_rank_ft)
    a = extract(llama_base, full_rank_ft, max_error=0.6, svd=svd)
    b = extract(llama_base, full_rank_ft, energy=1 - 0.6**2, svd=svd)
    out = save(a, tmp_path / "lora")
    assert {m: r.rank for m, r in a.modules.items()} == {m: r.rank for m, r in b.modules.items()}
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {m: r.rank for m, r in a.modules.items()}
    assert len(set(ranks.values())) > 1  # 64 x 64 and 128 x 64 modules need different ranks
    for m, rep in a.modules.items():
        s = torch.linalg.svdvals(D[f"{m}.weight"].double())
        errs = (s.square().sum() - torch.cumsum(s.square(), 0)).clamp(min=0).sqrt() / s.square().sum().sqrt()
        best = int(torch.nonzero(errs <= 0.6)[0]) + 1
        assert best <= rep.rank <= best + (0 if svd == "dense" else 1), (m, rep.rank, best)
        assert rep.error <= 0.6
        key = next((k for k in config["rank_pattern"] if k == m.replace(".", r"\.")), None)
        assert (config["rank_pattern"][key] if key else config["r"]) == rep.rank
        assert (config["alpha_pattern"][key] if key else config["lora_alpha"]) == rep.rank  # scale 1
    capped = extract(llama_base, full_rank_ft, max_error=0.01, rank=5, svd=svd)
    assert {r.rank for r in capped.modules.values()} == {5}


def test_finetune_saved_in_another_dtype(tmp_path):
    """bf16 base, float32 fine-tune: unchanged tensors compare equal in value and are not stored; the
    changed ones are differenced in float32, so PEFT on the (upcast) base reproduces the fine-tune."""
    base = make_llama(0, dtype=torch.bfloat16)
    save_model(base, tmp_path / "base")
    model = load_base(tmp_path / "base")  # float32 copy of the bf16 values
    tuned = merged_finetune(tmp_path / "base", tmp_path / "tuned", LoraConfig(r=4, target_modules=["o_proj"]),
                            model=model, seed=2)
    result = extract(tmp_path / "base", tuned, rank=4)
    assert set(result.modules) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert len(result.unchanged) == 19 and result.max_error < 1e-5
    out = save(result, tmp_path / "lora")
    assert {read_adapter(out).tensors.dtype(n) for n in read_adapter(out).tensors} == {"F32"}
    ids = input_ids()
    torch.testing.assert_close(peft_on_base(tmp_path / "base", out, ids), outputs(load_base(tuned), ids),
                               atol=2e-5, rtol=1e-5)
    # the other way round: a bf16 save of a float32 base differs only by rounding there
    save_model(make_llama(0), tmp_path / "base32")
    w = {k: v.to(torch.bfloat16) for k, v in load_file(str(tmp_path / "base32" / "model.safetensors")).items()}
    w["model.layers.0.mlp.up_proj.weight"] += 0.001
    (tmp_path / "tuned16").mkdir()
    save_file(w, str(tmp_path / "tuned16" / "model.safetensors"), metadata={"format": "pt"})
    r2 = extract(tmp_path / "base32", tmp_path / "tuned16", rank=2, dtype="float32")
    assert set(r2.modules) == {"model.layers.0.mlp.up_proj"}
    assert len(r2.rounding_only) == 15 and len(r2.unchanged) == 5  # the norms (ones) are exact in bf16


def test_multi_piece_reads_and_buffered_io_give_the_same_adapter(llama_base, llama_ft, monkeypatch):
    ref = extract(llama_base, llama_ft, rank=4)
    monkeypatch.setattr(extraction, "PIECE_ELEMENTS", 100)  # every weight read in many row pieces
    pieces = extract(llama_base, llama_ft, rank=4, direct_io=False)
    for n in ref.adapter.tensors:
        assert torch.equal(ref.adapter.tensors[n], pieces.adapter.tensors[n]), n
    assert ref.unchanged == pieces.unchanged


def test_resized_vocabulary_is_carried_whole_and_said(llama_base, tmp_path):
    model = load_base(llama_base)
    model.resize_token_embeddings(136)
    tuned = merged_finetune(llama_base, tmp_path / "tuned", LoraConfig(r=4, target_modules=["q_proj"]), model=model)
    result = extract(llama_base, tuned, rank=4)
    assert result.modules_to_save == ["lm_head", "model.embed_tokens"]
    assert any("resize_token_embeddings(136)" in n for n in result.notes)
    out = save(result, tmp_path / "lora")
    ids = input_ids(vocab=136)
    torch.testing.assert_close(peft_on_base(llama_base, out, ids, resize=136), outputs(load_base(tuned), ids),
                               atol=2e-5, rtol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------------


def test_another_base_is_refused_with_the_figure(llama_base, llama_other, tmp_path):
    with pytest.raises(NotAFineTuneError) as e:
        extract(llama_base, llama_other, rank=4)
    assert 1.2 < e.value.change < 1.6 and e.value.threshold == 0.5  # ~sqrt(2): two unrelated weights
    assert "is not a fine-tune of" in str(e.value) and "--allow-other-base" in str(e.value)
    r = run("extract", "--base", llama_base, "--tuned", llama_other, "--rank", 4, "-o", tmp_path / "x")
    assert r.exit_code == 1 and "Traceback" not in r.output and "not a fine-tune" in r.output
    assert not (tmp_path / "x").exists()
    forced = extract(llama_base, llama_other, rank=4, allow_other_base=True)
    assert all(1.2 < m.change < 1.6 for m in forced.modules.values())


def test_truncated_shard_is_refused(llama_base, tmp_path):
    save_model(make_llama(0), tmp_path / "tuned", max_shard_size="100KB")
    shard = sorted((tmp_path / "tuned").glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(BaseCheckpointError, match="truncated"):
        extract(llama_base, tmp_path / "tuned", rank=4)
    r = run("extract", "--base", llama_base, "--tuned", tmp_path / "tuned", "--rank", 4, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "truncated" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("where", ["tuned", "base"])
def test_nan_is_refused(llama_base, llama_ft, tmp_path, where):
    src = {"tuned": llama_ft, "base": llama_base}[where]
    w = load_file(str(src / "model.safetensors"))
    w["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    (tmp_path / where).mkdir()
    save_file(w, str(tmp_path / where / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / where / "config.json").write_text((src / "config.json").read_text())
    pair = {"base": llama_base, "tuned": llama_ft, where: tmp_path / where}
    with pytest.raises(NonFiniteWeightsError) as e:
        extract(pair["base"], pair["tuned"], rank=4)
    which = "fine-tune" if where == "tuned" else "base"
    assert e.value.tensor == "model.layers.1.self_attn.v_proj.weight" and f"NaN or Inf in the {which}" in str(e.value)
    r = run("extract", "--base", pair["base"], "--tuned", pair["tuned"], "--rank", 4, "-o", tmp_path / "x")
    assert r.exit_code == 1 and "NaN" in r.output and "Traceback" not in r.output


def test_mismatched_checkpoints_are_refused(llama_base, tmp_path):
    save_model(make_llama(0, hidden_size=32, intermediate_size=64), tmp_path / "narrow")
    with pytest.raises(CheckpointMismatchError, match=r"is \[128, 64\] in the base .* but \[128, 32\]"):
        extract(llama_base, tmp_path / "narrow", rank=4)
    w = load_file(str(llama_base / "model.safetensors"))
    w["score.weight"] = torch.zeros(2, 64)
    (tmp_path / "extra").mkdir()
    save_file(w, str(tmp_path / "extra" / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="only in the fine-tune \\(score.weight\\)"):
        extract(llama_base, tmp_path / "extra", rank=4)
    with pytest.raises(ExtractError, match="nothing to extract"):
        extract(llama_base, llama_base, rank=4)
    for name, zero in (("pos", 0.0), ("neg", -0.0)):  # other bytes, same values: still nothing changed
        w = load_file(str(llama_base / "model.safetensors"))
        w["model.layers.0.self_attn.q_proj.weight"][0, 0] = zero
        (tmp_path / name).mkdir()
        save_file(w, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(ExtractError, match="nothing to extract"):
        extract(tmp_path / "pos", tmp_path / "neg", rank=4)


def test_changes_peft_cannot_carry_are_named(tmp_path):
    base = make_llama(0, tie_word_embeddings=True)
    save_model(base, tmp_path / "base")
    w = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert "lm_head.weight" not in w
    w["model.embed_tokens.weight"][7] += 0.01
    w["model.layers.0.self_attn.q_proj.weight"] += 0.001
    (tmp_path / "tuned").mkdir()
    save_file(w, str(tmp_path / "tuned" / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    with pytest.raises(UnrepresentableChangeError, match="tied to the LM head") as e:
        extract(tmp_path / "base", tmp_path / "tuned", rank=2)
    assert e.value.tensors == ["model.embed_tokens.weight"]
    result = extract(tmp_path / "base", tmp_path / "tuned", rank=2, exclude="embed_tokens")
    assert result.not_extracted == {"model.embed_tokens.weight": "excluded by --target/--exclude"}
    assert set(result.modules) == {"model.layers.0.self_attn.q_proj"}
    r = run("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", 2, "--exclude",
            "embed_tokens", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "warning: model.embed_tokens.weight changed but is not in the adapter" in r.output


def test_bad_options_and_outputs_are_refused_before_any_work(llama_base, llama_ft, tmp_path):
    with pytest.raises(ExtractError, match="give --rank K, --energy F or --max-error E"):
        extract(llama_base, llama_ft)
    with pytest.raises(ExtractError, match="were both given"):
        extract(llama_base, llama_ft, energy=0.9, max_error=0.1)
    with pytest.raises(ExtractError, match="not a valid regular expression"):
        extract(llama_base, llama_ft, rank=4, target="(")
    with pytest.raises(ExtractError, match="unknown dtype"):
        extract(llama_base, llama_ft, rank=4, dtype="int8")
    r = run("extract", "--base", llama_base, "--tuned", llama_ft, "--rank", 4, "-o", llama_ft / "lora")
    assert r.exit_code == 2 and "lies inside an input checkpoint" in r.output
    assert not (llama_ft / "lora").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = run("extract", "--base", llama_base, "--tuned", llama_ft, "--rank", 4, "-o", tmp_path / "full")
    assert r.exit_code == 2 and "already exists" in r.output and (tmp_path / "full" / "keep.txt").exists()
    r = run("extract", "--base", llama_base, "--tuned", llama_ft, "--rank", 4, "--push", "Bad Name")
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = run("extract", "--base", llama_base, "--tuned", llama_ft, "--rank", 4)
    assert r.exit_code == 2 and "exactly one of" in r.output


def test_symlinked_output_into_an_input_is_refused(llama_base, llama_ft, tmp_path):
    (tmp_path / "link").symlink_to(llama_ft)
    with pytest.raises(OutputPathError, match="lies inside an input checkpoint"):
        save(extract(llama_base, llama_ft, rank=4), tmp_path / "link" / "lora")
    assert not (llama_ft / "lora").exists()


def test_disk_full_is_a_clear_error_and_leaves_nothing(llama_base, llama_ft, tiny_disk):
    with open(tiny_disk / "filler", "wb") as f:  # leave less room than the adapter needs
        f.write(b"\0" * (1024 * 1024 - 8192))
    r = run("extract", "--base", llama_base, "--tuned", llama_ft, "--rank", 4, "-o", tiny_disk / "lora")
    assert r.exit_code == 1 and "the disk is full" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_modes_follow_the_umask(llama_base, llama_ft, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = save(extract(llama_base, llama_ft, rank=4), tmp_path / "lora")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# --- CLI, registry, inspect ------------------------------------------------------------------------------


def test_cli_push_stores_lineage_and_inspect_shows_module_errors(llama_base, llama_ft, registry_cli, tmp_path):
    r = registry_cli("extract", "--base", llama_base, "--tuned", llama_ft, "--rank", 4, "--push", "team/ft",
                     "--tag", "prod")
    assert r.exit_code == 0, r.output
    assert "error       max" in r.output and "x smaller" in r.output and "unchanged   15 tensors" in r.output
    assert r.output.strip().splitlines()[-1].startswith("team/ft@1 sha256:")
    text = registry_cli("show", "team/ft@prod").output
    assert "recipe      extract(" in text and "weights None" not in text and "rank 4  change" in text
    show = json.loads(registry_cli("show", "team/ft@prod", "--json").output)["manifest"]
    base_fp = extraction.BaseCheckpoint.open(llama_base).fingerprint()
    tuned_fp = extraction.BaseCheckpoint.open(llama_ft).fingerprint()
    assert show["base"]["fingerprint"] == base_fp
    recipe = show["recipe"]
    assert recipe["recipe"] == "adapterhub.extract.v1" and recipe["method"] == "extract"
    assert (recipe["base"]["fingerprint"], recipe["tuned"]["fingerprint"]) == (base_fp, tuned_fp)
    assert set(recipe["modules"]) == {f"model.layers.{i}.{m}" for i in range(2)
                                      for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert all(v["rank"] == 4 and v["error"] < 1e-5 for v in recipe["modules"].values())
    r = registry_cli("pull", "team/ft", "-o", tmp_path / "pulled", "--format", "peft")
    assert r.exit_code == 0, r.output
    r = registry_cli("inspect", tmp_path / "pulled")
    assert r.exit_code == 0, r.output
    assert f"extracted   from {llama_ft}" in r.output and "error       max" in r.output
    assert "rank 4  change" in r.output and "model.layers.1.mlp.down_proj" in r.output
    info = json.loads(registry_cli("inspect", tmp_path / "pulled", "--json").output)
    assert info["extract"]["modules"] == recipe["modules"]


def test_cli_json_and_energy(llama_base, full_rank_ft, tmp_path):
    r = run("extract", "--base", llama_base, "--tuned", full_rank_ft, "--energy", "0.64", "--dtype", "bfloat16",
            "-o", tmp_path / "lora", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["modules"] == 14 and info["max_error"] <= 0.61 and len(info["ranks"]) > 1
    assert info["output"] == str(tmp_path / "lora") and info["full_bytes"] > 2 * info["adapter_bytes"]
    assert read_adapter(tmp_path / "lora").tensors.dtype("model.layers.0.mlp.up_proj.lora_A") == "BF16"


def test_importing_adapterhub_does_not_import_torch():
    code = ("import sys, adapterhub; assert 'torch' not in sys.modules; f = adapterhub.extract; "
            "assert f.__module__ == 'adapterhub.extraction' and callable(f); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    assert math.isclose(extraction.MAX_CHANGE, 0.5)


@pytest.mark.parametrize("options", [{}, {"energy": 0.9, "max_error": 0.1}, {"rank": 0}, {"rank": True},
                                     {"rank": 4.0}, {"energy": float("nan")}, {"energy": 1.5}, {"max_error": -1.0},
                                     {"rank": 4, "dtype": "float64"}, {"rank": 4, "svd": "exact"},
                                     {"rank": 4, "oversample": -1}])
def test_every_refused_option_says_how_to_fix_it(options, llama_base, llama_ft):
    """rank/energy/max_error/dtype refusals had no fix line; rank=True was taken as rank 1."""
    with pytest.raises(ExtractError, match=r"\n  fix: "):
        extract(llama_base, llama_ft, **options)
