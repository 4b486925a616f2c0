"""Merged-checkpoint export: loads in transformers, equals PEFT's merge_and_unload, rounds once, refuses bad input."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS_LIB, input_ids, load_base, make_llama, raw_file, save_model
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

from adapterhub.base import BaseCheckpoint
from adapterhub.cli import cli
from adapterhub.errors import BaseCheckpointError, CompatibilityError, StorageError
from adapterhub.export import ExportError, export_merged
from adapterhub.formats import read_adapter


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def peft_merged(base_dir, adapter_dirs, cls=AutoModelForCausalLM):
    model = cls.from_pretrained(base_dir)
    for i, d in enumerate(adapter_dirs):
        model = PeftModel.from_pretrained(model, d, adapter_name=f"a{i}").merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    return save_model(make_llama(0), tmp_path_factory.mktemp("base") / "sharded", max_shard_size="100KB")


def test_lora_export_loads_in_transformers_and_equals_peft(llama_base, make_peft, tmp_path):
    a = make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2}))
    b = make_peft(llama_base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                  seed=1)
    result = run("export", a, b, "--base", llama_base, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = peft_merged(llama_base, [a, b])
    ids = input_ids()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    for k, v in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[k], v, atol=1e-6), k
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"model.safetensors", "config.json", "README.md",
                                                               "generation_config.json"}


def test_minilm_export_equals_peft(minilm_dir, make_peft, tmp_path):
    a = make_peft(minilm_dir, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"]), seed=3)
    out = export_merged(minilm_dir, [read_adapter(a)], tmp_path / "out").path
    ours = AutoModel.from_pretrained(out).eval()
    ref = peft_merged(minilm_dir, [a], cls=AutoModel)
    ids = input_ids(30522)
    with torch.no_grad():
        got, want = ours(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    for extra in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (out / extra).is_file(), extra


def test_weighted_sum_of_two_loras(llama_base, make_peft, tmp_path):
    a = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]), seed=1)
    b = make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=2)
    result = run("export", f"{a}=0.5", f"{b}=-1", "--base", llama_base, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    base = BaseCheckpoint.open(llama_base)
    A, B = read_adapter(a), read_adapter(b)
    name = "model.layers.0.self_attn.q_proj"
    w = base.tensors[f"{name}.weight"]
    from adapterhub.tensorfile import load_tensor

    def delta(ad):
        n = ad.module_tensors(name)
        return ad.tensors[n["lora_B"]] @ ad.tensors[n["lora_A"]] * ad.spec.scale(name)

    expected = load_tensor(w) + 0.5 * delta(A) - delta(B)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        got = f.get_tensor(f"{name}.weight")
        meta = json.loads(f.metadata()["adapterhub.provenance"])
    assert torch.allclose(got, expected, atol=1e-6)
    assert [s["weight"] for s in meta["sources"]] == [0.5, -1.0]
    assert all(s["digest"].startswith("sha256:") for s in meta["sources"])


def test_bf16_base_is_rounded_once(tmp_path, make_peft):
    base_dir = save_model(make_llama(0, dtype=torch.bfloat16), tmp_path / "bf16")
    a = make_peft(base_dir, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]), seed=1)
    b = make_peft(base_dir, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]), seed=2)
    A, B = read_adapter(a), read_adapter(b)
    out = export_merged(base_dir, [A, B], tmp_path / "out").path
    name = "model.layers.1.self_attn.q_proj"
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        w = f.get_tensor(f"{name}.weight")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor(f"{name}.weight")
    assert got.dtype == torch.bfloat16

    def delta(ad):
        n = ad.module_tensors(name)
        return (ad.tensors[n["lora_B"]].double() @ ad.tensors[n["lora_A"]].double()) * ad.spec.scale(name)

    exact = w.double() + delta(A) + delta(B)
    once = exact.float().to(torch.bfloat16)
    stepwise = ((w.float() + delta(A).float()).to(torch.bfloat16).float() + delta(B).float()).to(torch.bfloat16)
    assert torch.equal(got, once)
    err = lambda t: float((t.double() - exact).abs().sum())  # noqa: E731
    assert err(got) < err(stepwise), "rounding once must beat rounding after each adapter"


def test_sharded_in_sharded_out(sharded_base, make_peft, tmp_path):
    assert (sharded_base / "model.safetensors.index.json").is_file()
    a = make_peft(sharded_base, LoraConfig(r=4, target_modules="all-linear"))
    out = export_merged(sharded_base, [read_adapter(a)], tmp_path / "out", max_shard_size="120KB").path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sizes = 0
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            for k in f.keys():
                sizes += f.get_tensor(k).numel() * 4
                assert index["weight_map"][k] == s
    assert index["metadata"]["total_size"] == sizes
    assert set(index["weight_map"]) == set(BaseCheckpoint.open(sharded_base).tensors)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = peft_merged(sharded_base, [a])
    ids = input_ids()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def test_dtype_conversion(llama_base, make_peft, tmp_path):
    a = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    out = export_merged(llama_base, [read_adapter(a)], tmp_path / "out", dtype="bfloat16").path
    model = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unfoldable_adapters_are_refused_or_kept_beside(llama_base, make_peft, tmp_path):
    lora = read_adapter(make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"])))
    prefix = read_adapter(make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")))
    with pytest.raises(ExportError, match="(?s)cannot be folded.*--keep-unmerged"):
        export_merged(llama_base, [lora, prefix], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    result = export_merged(llama_base, [lora, prefix], tmp_path / "kept", keep_unmerged=True)
    assert len(result.unmerged) == 1
    kept = read_adapter(result.path / result.unmerged[0])
    assert kept.kind == "prefix" and torch.equal(kept.tensors["prompt_embeddings"],
                                                 prefix.tensors["prompt_embeddings"])
    assert "Not merged" in (result.path / "README.md").read_text()
    bottleneck = read_adapter(ADAPTERS_LIB / "llama_seq_bn")
    cli_result = run("export", ADAPTERS_LIB / "llama_seq_bn", "--base", ADAPTERS_LIB / "tiny_llama_base", "-o",
                     tmp_path / "bn")
    assert cli_result.exit_code == 1 and "--keep-unmerged" in cli_result.output and not (tmp_path / "bn").exists()
    assert bottleneck.kind == "bottleneck"


def test_bad_inputs_leave_no_output(llama_base, sharded_base, wide_lora, tmp_path):
    lora_dir = wide_lora
    with pytest.raises(CompatibilityError):
        export_merged(llama_base, [read_adapter(lora_dir)], tmp_path / "wrong-base")
    assert not (tmp_path / "wrong-base").exists()
    broken = shutil.copytree(sharded_base, tmp_path / "missing-shard")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (broken / victim).unlink()
    with pytest.raises(BaseCheckpointError, match=victim):
        export_merged(broken, [], tmp_path / "o1")
    absent = shutil.copytree(sharded_base, tmp_path / "absent-name")
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (absent / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BaseCheckpointError, match="model-00099-of-00099.safetensors"):
        export_merged(absent, [], tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    result = run("export", lora_dir, "--base", llama_base, "-o", tmp_path / "o3")
    assert result.exit_code == 1 and "INCOMPATIBLE" in result.output and "Traceback" not in result.output


@pytest.fixture
def wide_lora(make_peft, tmp_path):
    wide = save_model(make_llama(0, hidden_size=96), tmp_path / "wide")
    return make_peft(wide, LoraConfig(r=4, target_modules=["q_proj"]))


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, make_peft, tiny_disk):
    base_dir = save_model(make_llama(0, hidden_size=256, intermediate_size=512, vocab_size=1024), tmp_path / "big")
    lora = read_adapter(make_peft(base_dir, LoraConfig(r=4, target_modules=["q_proj"])))
    with pytest.raises(StorageError, match="disk is full"):
        export_merged(base_dir, [lora], tiny_disk / "out")
    assert list(tiny_disk.iterdir()) == []


def test_base_is_left_untouched(llama_base, make_peft, tmp_path):
    before = {p.name: p.read_bytes() for p in llama_base.iterdir() if p.is_file()}
    a = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    export_merged(llama_base, [read_adapter(a)], tmp_path / "out")
    assert {p.name: p.read_bytes() for p in llama_base.iterdir() if p.is_file()} == before
    assert load_base(llama_base) is not None


def test_export_with_blend_method_and_registry(llama_base, make_peft, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "reg"))
    a = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]), seed=1)
    b = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]), seed=2)
    assert run("push", a, "team/a").exit_code == 0 and run("push", b, "team/b").exit_code == 0
    result = run("export", "team/a=0.6", "team/b=0.4", "--method", "svd", "--rank", "4", "--base", llama_base,
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["adapterhub.provenance"])
    assert meta["method"] == "svd" and [s["ref"] for s in meta["sources"]] == ["team/a@1", "team/b@1"]


def test_direct_and_buffered_io_write_identical_files(sharded_base, make_peft, tmp_path):
    a = read_adapter(make_peft(sharded_base, LoraConfig(r=4, target_modules="all-linear")))
    fixed = {"created_at": "2026-01-01T00:00:00Z"}
    outs = [export_merged(sharded_base, [a], tmp_path / f"o{d}", max_shard_size="120KB", provenance=fixed,
                          direct_io=d).path for d in (True, False)]
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and len(files) > 3
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def write_raw_safetensors(path, tensors: dict[str, torch.Tensor], pad: str) -> None:
    """A safetensors file in the given tensor order with an unpadded header (offsets need not be aligned)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw_file(path, header, b"".join(blobs), header_bytes=json.dumps(header).encode() + pad.encode())


def test_misaligned_base_offsets_and_odd_sized_tensors(llama_base, make_peft, tmp_path):
    """A base written by another tool: odd header length, a 3-byte tensor first, so every weight starts at an
    odd offset. The export reads it right and writes an aligned checkpoint (widest dtype first)."""
    lora = read_adapter(make_peft(llama_base, LoraConfig(r=4, target_modules="all-linear"), seed=5))
    with safe_open(str(llama_base / "model.safetensors"), "pt") as f:
        tensors = {"aaa.flags": torch.tensor([1, 2, 3], dtype=torch.uint8)}
        tensors |= {k: f.get_tensor(k).to(torch.bfloat16) for k in sorted(f.keys())}
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(llama_base / "config.json", odd / "config.json")
    write_raw_safetensors(odd / "model.safetensors", tensors, pad=" " * (7 - len(json.dumps({})) % 8))
    starts = [i.start for i in BaseCheckpoint.open(odd).tensors.values()]
    assert any(s % 2 for s in starts), "the fixture must put weights at odd offsets"
    out = export_merged(odd, [lora], tmp_path / "out").path
    base = BaseCheckpoint.open(odd)
    from adapterhub.compose.merge import merge_into

    expected = merge_into(base, [lora])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(expected)
        for k, v in expected.items():
            assert torch.equal(f.get_tensor(k), v), k
    for info in BaseCheckpoint.open(out).tensors.values():
        assert info.start % (4 if info.dtype == "F32" else 2 if info.dtype == "BF16" else 1) == 0, info


def test_float32_export_of_a_bf16_base_is_not_rounded_to_bf16(tmp_path, make_peft):
    base_dir = save_model(make_llama(0, dtype=torch.bfloat16), tmp_path / "bf16")
    ad = read_adapter(make_peft(base_dir, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]), seed=1))
    out = export_merged(base_dir, [ad], tmp_path / "out", dtype="float32").path
    name = "model.layers.0.self_attn.q_proj"
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        w = f.get_tensor(f"{name}.weight")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor(f"{name}.weight")
    n = ad.module_tensors(name)
    exact = w.double() + (ad.tensors[n["lora_B"]].double() @ ad.tensors[n["lora_A"]].double()) * ad.spec.scale(name)
    assert got.dtype == torch.float32
    assert float((got.double() - exact).abs().max()) < 1e-6 < float((exact.to(torch.bfloat16).double() - exact)
                                                                        .abs().max())


@pytest.mark.parametrize("failure", ["truncated", "io-error"])
def test_a_failing_read_stops_the_pipeline_and_leaves_nothing(sharded_base, make_peft, tmp_path, monkeypatch,
                                                              failure):
    """An error on the reader thread (a shard that shrank after it was opened, a disk error) reaches the
    caller as a clear error, every thread stops, and nothing is left at the target."""
    import errno

    from adapterhub import streamio

    a = read_adapter(make_peft(sharded_base, LoraConfig(r=4, target_modules="all-linear")))
    real = streamio.DirectReader.read
    calls = []

    def read(self, path, offset, nbytes, pool):
        calls.append(path)
        if len(calls) == 5:
            if failure == "truncated":
                raise streamio.CorruptFileError(f"{path} ends early: the file is truncated.", path=path)
            raise OSError(errno.EIO, "Input/output error")
        return real(self, path, offset, nbytes, pool)

    monkeypatch.setattr(streamio.DirectReader, "read", read)
    before = threading.active_count()
    expected = (streamio.CorruptFileError, "truncated") if failure == "truncated" else (ExportError,
                                                                                        "(?s)reading .*Input/output")
    with pytest.raises(expected[0], match=expected[1]):
        export_merged(sharded_base, [a], tmp_path / "out", max_shard_size="120KB")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert threading.active_count() == before


def test_a_nan_fold_stops_the_pipeline_and_leaves_nothing(llama_base, make_peft, tmp_path):
    from adapterhub.adapter import Tensors
    from adapterhub.compose.merge import MergeError
    from adapterhub.errors import NonFiniteError

    a = read_adapter(make_peft(llama_base, LoraConfig(r=4, target_modules=["v_proj"])))
    names = a.module_tensors("model.layers.1.self_attn.v_proj")
    tensors = {k: a.tensors[k] for k in a.tensors}
    nan = tensors[names["lora_B"]].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.self_attn\.v_proj\.lora_B \(1 value\)"):
        export_merged(llama_base, [a.replace(tensors=Tensors({**tensors, names["lora_B"]: nan}))], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # finite factors whose product overflows float32: found while folding, and the pipeline stops
    big_a, big_b = tensors[names["lora_A"]].clone(), tensors[names["lora_B"]].clone()
    big_a[0, :], big_b[0, 0] = 100.0, 3e38
    poisoned = a.replace(tensors=Tensors({**tensors, names["lora_A"]: big_a, names["lora_B"]: big_b}))
    with pytest.raises(MergeError, match=r"v_proj\.weight gives 64 NaN"):
        export_merged(llama_base, [poisoned], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["embed_tokens", "v_proj"],
               modules_to_save=["lm_head"]),
    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
], ids=["dora", "rslora-embedding-carried-head", "ia3"])
def test_huge_tensors_are_folded_in_row_pieces(llama_base, make_peft, tmp_path, monkeypatch, config):
    """With pieces of a few rows (as a 70B embedding would get at the default size) the export still equals
    PEFT's merge, for every fold role."""
    import adapterhub.export as export_module

    monkeypatch.setattr(export_module, "FOLD_PIECE", 700)
    a = make_peft(llama_base, config, seed=4)
    assert len(export_module._row_pieces(*BaseCheckpoint.open(llama_base).tensors["lm_head.weight"].shape, "F32",
                                         "F32")) > 50
    out = export_merged(llama_base, [read_adapter(a)], tmp_path / "out").path
    ref = peft_merged(llama_base, [a]).state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k, v in ref.items():
            torch.testing.assert_close(f.get_tensor(k), v, rtol=0, atol=1e-6, msg=k)


def test_dtype_conversion_in_pieces_and_float16_overflow(tmp_path, monkeypatch):
    """Converted tensors are streamed in flat pieces of any shape; a value float16 cannot hold is refused
    with a fix, not written as inf."""
    import adapterhub.export as export_module

    monkeypatch.setattr(export_module, "FOLD_PIECE", 96)
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 13, generator=g), "b.bias": torch.randn(29, generator=g),
               "c.scalar": torch.tensor(0.5), "d.conv": torch.randn(3, 2, 5, generator=g),
               "e.ids": torch.arange(10, dtype=torch.int64)}
    base = tmp_path / "base"
    base.mkdir()
    from safetensors.torch import save_file

    save_file(tensors, str(base / "model.safetensors"))
    out = export_merged(base, [], tmp_path / "out", dtype="bfloat16").path
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t.to(torch.bfloat16) if t.is_floating_point() else t), k
    tensors["b.bias"][3] = 1e6
    save_file(tensors, str(base / "model.safetensors"))
    from adapterhub.compose.merge import MergeError

    with pytest.raises(MergeError, match=r"(?s)b\.bias: 1 value\(s\) overflow torch.float16.*--dtype"):
        export_merged(base, [], tmp_path / "out16", dtype="float16")
    assert not (tmp_path / "out16").exists()


def test_float8_weights_fold_and_fnuz_dtypes_convert(tmp_path):
    from adapterhub.adapter import Adapter, LoraSpec, Tensors
    from adapterhub.dtypes import st_to_torch

    assert st_to_torch("F8_E4M3FNUZ") == torch.float8_e4m3fnuz
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(16, 8, generator=g) * 0.5).to(torch.float8_e4m3fn)
    other = (torch.randn(4, 4, generator=g)).to(torch.float8_e4m3fnuz)
    base = tmp_path / "base"
    base.mkdir()
    from safetensors.torch import save_file

    save_file({"layer.proj.weight": w, "other.weight": other}, str(base / "model.safetensors"))
    A, B = torch.randn(2, 8, generator=g) * 0.1, torch.randn(16, 2, generator=g) * 0.1
    lora = Adapter(kind="lora", spec=LoraSpec(r=2, alpha=2, target_modules=["proj"]),
                   tensors=Tensors({"layer.proj.lora_A": A, "layer.proj.lora_B": B}))
    out = export_merged(base, [lora], tmp_path / "out").path
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor("layer.proj.weight")
        assert got.dtype == torch.float8_e4m3fn
        assert torch.equal(got.float(), (w.float() + B @ A).to(torch.float8_e4m3fn).float())
    conv = export_merged(base, [], tmp_path / "bf16", dtype="bfloat16").path
    with safe_open(str(conv / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("other.weight"), other.to(torch.bfloat16))


def _tensor_bytes(out) -> dict[str, bytes]:
    """Each shard's tensor bytes (the header holds the export time)."""
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        data = f.read_bytes()
        got[f.name] = data[8 + int.from_bytes(data[:8], "little"):]
    return got


def test_any_number_of_fold_workers_and_tiny_pieces_give_identical_files(sharded_base, make_peft, tmp_path,
                                                                          monkeypatch):
    """Pieces are folded by several threads at once and written in file order: the files are the same
    byte for byte whatever the number of workers, with pieces of a few rows and raw pieces of a few
    bytes (many more pieces than buffers, so a wrong order or a wait cycle would show), and torch's
    thread setting is as it was."""
    import adapterhub.export as export_module

    a = make_peft(sharded_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                  seed=6)
    b = make_peft(sharded_base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                  seed=7)
    adapters = [read_adapter(a), read_adapter(b)]
    threads = torch.get_num_threads()

    def export(workers: int, name: str, **kw) -> dict[str, bytes]:
        monkeypatch.setattr(export_module, "fold_workers", lambda: workers)
        return _tensor_bytes(export_merged(sharded_base, adapters, tmp_path / name, **kw).path)

    assert export(1, "one") == export(3, "three")
    assert torch.get_num_threads() == threads, "the fold workers' single-thread setting must not leak"
    monkeypatch.setattr(export_module, "FOLD_PIECE", 700)
    monkeypatch.setattr(export_module, "RAW_CHUNK", 333)
    want = export(1, "tiny-1", max_shard_size="150KB")
    assert len(want) > 1
    for workers in (2, 5):
        assert export(workers, f"tiny-{workers}", max_shard_size="150KB") == want, workers
    assert torch.get_num_threads() == threads


def test_a_fold_that_overflows_the_output_dtype_is_refused(tmp_path):
    """A finite float32 sum that float16 cannot hold is refused on the fold path too (its check reads
    each block's extremes, not a second pass over the output)."""
    from safetensors.torch import save_file

    from adapterhub.adapter import Adapter, LoraSpec, Tensors
    from adapterhub.compose.merge import MergeError

    base = tmp_path / "base"
    base.mkdir()
    w = torch.zeros(6, 4)
    save_file({"model.layers.0.self_attn.q_proj.weight": w}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    A = torch.zeros(1, 4)
    B = torch.zeros(6, 1)
    A[0, 2], B[4, 0] = 300.0, 300.0  # 90,000 at row 4, column 2: float16 holds at most 65,504
    lora = Adapter(kind="lora", spec=LoraSpec(r=1, alpha=1, target_modules=("q_proj",)), tensors=Tensors({
        "model.layers.0.self_attn.q_proj.lora_A": A, "model.layers.0.self_attn.q_proj.lora_B": B}))
    with pytest.raises(MergeError, match=r"(?s)q_proj\.weight: 1 value\(s\) overflow torch.float16.*--dtype"):
        export_merged(base, [lora], tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()
    out = export_merged(base, [lora], tmp_path / "bf16", dtype="bfloat16").path
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight")[4, 2].item() == 90112.0  # bf16 of 90,000


INTERRUPTED_EXPORT = """
import sys, threading, time
from pathlib import Path
import adapterhub.streamio as streamio
from adapterhub.export import export_merged
from adapterhub.formats import read_adapter

real = streamio.DirectWriter.write
def slow(self, data):
    if not getattr(slow, "told", False):
        slow.told = True
        print("WRITING", flush=True)
    time.sleep(0.05)
    return real(self, data)
streamio.DirectWriter.write = slow
base, adapter, out = sys.argv[1:]
try:
    export_merged(base, [read_adapter(adapter)], out)
    print("FINISHED")
except KeyboardInterrupt:
    left = [t.name for t in threading.enumerate() if t.name.startswith("adapterhub-export")]
    print("INTERRUPTED", left, sorted(p.name for p in Path(out).parent.iterdir()))
"""


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["while-threads-start", "while-writing"])
def test_ctrl_c_stops_every_export_thread_and_leaves_nothing(sharded_base, make_peft, tmp_path, delay):
    import signal
    import subprocess
    import sys
    import time

    a = make_peft(sharded_base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), seed=8)
    parent = tmp_path / "outs"
    parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_EXPORT, str(sharded_base), str(a),
                             str(parent / "merged")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.strip() == "INTERRUPTED [] []", (out, err)
