"""adapterhub.base.BaseCheckpoint on real Hugging Face checkpoints written by transformers.

A tiny Llama is saved as one file and as shards; weights are compared against the model's own
state dict, and the fingerprint against models that differ by seed, by one tensor, or by dtype.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapterhub.base import INDEX_NAME, SINGLE_NAME, BaseCheckpoint
from adapterhub.errors import BaseCheckpointError, CorruptFileError
from adapterhub.tensorfile import load_tensor

CHANGED = "model.layers.1.self_attn.q_proj.weight"
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def tiny_llama(seed: int):  # noqa: ANN201 - transformers type
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    out = {name: root / name for name in ("single", "sharded", "seed1", "one_changed", "bf16")}
    model = tiny_llama(0)
    model.save_pretrained(out["single"])
    model.save_pretrained(out["sharded"], max_shard_size="50KB")
    tiny_llama(1).save_pretrained(out["seed1"])
    model.to(torch.bfloat16).save_pretrained(out["bf16"])
    model = tiny_llama(0)
    with torch.no_grad():
        model.get_parameter(CHANGED).mul_(1.001)
    model.save_pretrained(out["one_changed"])
    return out


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """The seed-0 model's own state dict: the oracle for names, shapes and dtypes."""
    return tiny_llama(0).state_dict()


@pytest.fixture
def sharded_copy(ckpts: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the sharded checkpoint that a test may damage."""
    return Path(shutil.copytree(ckpts["sharded"], tmp_path / "ckpt"))


def edit_index(ckpt: Path, edit) -> None:  # noqa: ANN001
    path = ckpt / INDEX_NAME
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


# --- opening -------------------------------------------------------------------------------------------


def test_layouts_are_what_the_tests_assume(ckpts: dict[str, Path]) -> None:
    assert (ckpts["single"] / SINGLE_NAME).is_file() and not (ckpts["single"] / INDEX_NAME).exists()
    assert (ckpts["sharded"] / INDEX_NAME).is_file() and not (ckpts["sharded"] / SINGLE_NAME).exists()
    assert len(list(ckpts["sharded"].glob("model-*.safetensors"))) >= 3


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_open_matches_state_dict(ckpts: dict[str, Path], state: dict[str, torch.Tensor], layout: str) -> None:
    base = BaseCheckpoint.open(ckpts[layout])
    assert base.path == ckpts[layout]
    assert set(base.tensors) == set(state)
    for name, t in state.items():
        info = base.tensors[name]
        assert info.shape == tuple(t.shape), name
        assert info.dtype == ST_DTYPES[t.dtype], name
        assert info.name == name
        assert info.path in base.files
    assert base.num_parameters == sum(t.numel() for t in state.values())
    assert base.modules["model.layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    assert base.modules["lm_head"] == "lm_head.weight"
    assert set(base.modules.values()) == {n for n in state if n.endswith(".weight")}


def test_single_and_sharded_agree(ckpts: dict[str, Path], state: dict[str, torch.Tensor]) -> None:
    single, sharded = BaseCheckpoint.open(ckpts["single"]), BaseCheckpoint.open(ckpts["sharded"])
    assert len(single.files) == 1 and single.files[0] == ckpts["single"] / SINGLE_NAME
    shard_files = sorted(ckpts["sharded"].glob("model-*.safetensors"))
    assert sorted(sharded.files) == shard_files
    assert {n: (t.dtype, t.shape) for n, t in single.tensors.items()} == {
        n: (t.dtype, t.shape) for n, t in sharded.tensors.items()
    }
    index = json.loads((ckpts["sharded"] / INDEX_NAME).read_text())["weight_map"]
    for name, info in sharded.tensors.items():
        assert info.path.name == index[name]
        # the recorded byte ranges hold the real weights, in both layouts
        assert torch.equal(load_tensor(info), state[name])
        assert torch.equal(load_tensor(single.tensors[name]), state[name])


def test_config_properties(ckpts: dict[str, Path]) -> None:
    for layout in ("single", "sharded", "bf16"):
        base = BaseCheckpoint.open(ckpts[layout])
        assert base.config["model_type"] == "llama"
        assert (base.num_layers, base.num_kv_heads, base.head_dim, base.hidden_size) == (2, 2, 16, 64)
        assert base.num_attention_heads == 4


def test_bf16_checkpoint_dtypes(ckpts: dict[str, Path]) -> None:
    base = BaseCheckpoint.open(ckpts["bf16"])
    assert {t.dtype for t in base.tensors.values()} == {"BF16"}


# --- fingerprint ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fingerprints(ckpts: dict[str, Path]) -> dict[str, str]:
    return {name: BaseCheckpoint.open(path).fingerprint() for name, path in ckpts.items()}


def test_fingerprint_format_and_stable(ckpts: dict[str, Path], fingerprints: dict[str, str]) -> None:
    fp = fingerprints["single"]
    assert re.fullmatch(r"fp1:[0-9a-f]{64}", fp)
    base = BaseCheckpoint.open(ckpts["single"])
    assert base.fingerprint() == base.fingerprint() == fp
    assert BaseCheckpoint.open(ckpts["single"]).fingerprint() == fp


def test_fingerprint_ignores_sharding(fingerprints: dict[str, str]) -> None:
    assert fingerprints["single"] == fingerprints["sharded"]


def test_fingerprint_ignores_file_names(ckpts: dict[str, Path], fingerprints: dict[str, str], tmp_path: Path) -> None:
    moved = Path(shutil.copytree(ckpts["sharded"], tmp_path / "renamed"))
    renames = {p.name: f"weights-part{i}.safetensors" for i, p in enumerate(sorted(moved.glob("model-*")))}
    for old, new in renames.items():
        (moved / old).rename(moved / new)
    edit_index(moved, lambda wm: wm.update({k: renames[v] for k, v in wm.items()}))
    assert BaseCheckpoint.open(moved).fingerprint() == fingerprints["single"]


def test_fingerprint_differs_for_another_fine_tune(ckpts: dict[str, Path], fingerprints: dict[str, str]) -> None:
    a, b = BaseCheckpoint.open(ckpts["single"]), BaseCheckpoint.open(ckpts["seed1"])
    # same architecture: only the bytes differ
    layout = {n: (t.dtype, t.shape) for n, t in a.tensors.items()}
    assert layout == {n: (t.dtype, t.shape) for n, t in b.tensors.items()}
    assert fingerprints["single"] != fingerprints["seed1"]


def test_fingerprint_catches_one_tensor_changed(ckpts: dict[str, Path], fingerprints: dict[str, str]) -> None:
    a, b = BaseCheckpoint.open(ckpts["single"]), BaseCheckpoint.open(ckpts["one_changed"])
    # precondition: exactly one tensor differs, and it differs in every element
    differing = [n for n in a.tensors if not torch.equal(load_tensor(a.tensors[n]), load_tensor(b.tensors[n]))]
    assert differing == [CHANGED]
    old, new = load_tensor(a.tensors[CHANGED]), load_tensor(b.tensors[CHANGED])
    assert bool((old != new).all())
    assert torch.allclose(old * 1.001, new)
    assert fingerprints["single"] != fingerprints["one_changed"]


def test_fingerprint_differs_by_dtype(fingerprints: dict[str, str]) -> None:
    assert fingerprints["single"] != fingerprints["bf16"]


def patched_copy(src: Path, dst: Path, tensor: str, where: str) -> Path:
    """A copy of a checkpoint with 4 bytes of one tensor overwritten in place (same header, same size)."""
    ckpt = Path(shutil.copytree(src, dst))
    info = BaseCheckpoint.open(ckpt).tensors[tensor]
    offset = {"first": 0, "middle": info.nbytes // 2, "last": info.nbytes - 4, "between_samples": info.nbytes // 4}
    with open(info.path, "r+b") as f:
        f.seek(info.start + offset[where])
        old = f.read(4)
        f.seek(info.start + offset[where])
        f.write(bytes(b ^ 0xFF for b in old))
    return ckpt


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_fingerprint_catches_bytes_changed_in_place(ckpts: dict[str, Path], fingerprints: dict[str, str],
                                                    tmp_path: Path, where: str) -> None:
    ckpt = patched_copy(ckpts["single"], tmp_path / "patched", "model.embed_tokens.weight", where)
    assert BaseCheckpoint.open(ckpt).fingerprint() != fingerprints["single"]


def test_fingerprint_reads_only_samples(ckpts: dict[str, Path], fingerprints: dict[str, str], tmp_path: Path) -> None:
    """The documented trade-off: a large tensor is sampled (start, middle, end), not hashed in full."""
    info = BaseCheckpoint.open(ckpts["single"]).tensors["model.embed_tokens.weight"]
    assert info.nbytes == 128 * 64 * 4  # large enough to be sampled rather than read whole
    ckpt = patched_copy(ckpts["single"], tmp_path / "patched", "model.embed_tokens.weight", "between_samples")
    assert BaseCheckpoint.open(ckpt).fingerprint() == fingerprints["single"]


def rewrite_header(ckpt: Path, edit) -> None:  # noqa: ANN001
    """Change a single-file checkpoint's header in place, keeping its length (so the data stays put)."""
    path = ckpt / SINGLE_NAME
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    raw[8 : 8 + n] = new.ljust(n, b" ")
    path.write_bytes(bytes(raw))


def test_fingerprint_covers_dtype_and_shape(ckpts: dict[str, Path], fingerprints: dict[str, str],
                                            tmp_path: Path) -> None:
    """Identical bytes read as another dtype, or with another shape, are another checkpoint."""
    as_f16 = Path(shutil.copytree(ckpts["bf16"], tmp_path / "as_f16"))
    rewrite_header(as_f16, lambda h: [e.update(dtype="F16") for k, e in h.items() if k != "__metadata__"])
    reshaped = Path(shutil.copytree(ckpts["single"], tmp_path / "reshaped"))
    rewrite_header(reshaped, lambda h: h[CHANGED].update(shape=[32, 128]))
    f16, resh = BaseCheckpoint.open(as_f16), BaseCheckpoint.open(reshaped)
    assert {t.dtype for t in f16.tensors.values()} == {"F16"} and resh.tensors[CHANGED].shape == (32, 128)
    assert f16.fingerprint() != fingerprints["bf16"]
    assert resh.fingerprint() != fingerprints["single"]


# --- bad input ------------------------------------------------------------------------------------------


def test_not_a_directory(ckpts: dict[str, Path], tmp_path: Path) -> None:
    for path in (ckpts["single"] / SINGLE_NAME, tmp_path / "does-not-exist"):
        with pytest.raises(BaseCheckpointError, match="is not a directory") as ei:
            BaseCheckpoint.open(path)
        assert str(path) in str(ei.value)


def test_no_weights(ckpts: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(ckpts["single"] / "config.json", tmp_path / "config.json")
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "model.safetensors" in msg and INDEX_NAME in msg
    assert "pickle" not in msg


def test_only_pytorch_bin(ckpts: dict[str, Path], state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    shutil.copy(ckpts["single"] / "config.json", tmp_path / "config.json")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(tmp_path)
    msg = str(ei.value)
    assert "pytorch_model.bin" in msg and "convert them to safetensors" in msg


def test_index_names_missing_shard(sharded_copy: Path) -> None:
    victim = sorted(sharded_copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(sharded_copy)
    msg = str(ei.value)
    assert repr(victim.name) in msg and "missing" in msg and str(sharded_copy) in msg


def test_index_names_tensor_its_shard_lacks(sharded_copy: Path) -> None:
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0].name
    edit_index(sharded_copy, lambda wm: wm.update({"model.layers.9.mlp.up_proj.weight": shard}))
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(sharded_copy)
    msg = str(ei.value)
    assert "'model.layers.9.mlp.up_proj.weight'" in msg and repr(shard) in msg and "does not hold it" in msg


def test_index_puts_tensor_in_wrong_shard(sharded_copy: Path) -> None:
    index = json.loads((sharded_copy / INDEX_NAME).read_text())["weight_map"]
    # a tensor whose shard holds others too, so that every shard is still listed after the edit
    name = next(n for n, s in sorted(index.items()) if list(index.values()).count(s) > 1)
    wrong = next(s for s in sorted(set(index.values())) if s != index[name])
    edit_index(sharded_copy, lambda wm: wm.update({name: wrong}))
    with pytest.raises(BaseCheckpointError, match=re.escape(f"'{name}'")) as ei:
        BaseCheckpoint.open(sharded_copy)
    assert repr(wrong) in str(ei.value)


@pytest.mark.parametrize("kind", ["parent", "nested_parent", "absolute", "subdir"])
def test_index_shard_outside_directory(sharded_copy: Path, kind: str) -> None:
    # the file the index points to really exists, so only the path itself can be the reason to refuse
    outside = sharded_copy.parent / "x.safetensors"
    shutil.copy(next(sharded_copy.glob("model-00001-*")), outside)
    (sharded_copy / "sub").mkdir()
    shutil.copy(next(sharded_copy.glob("model-00001-*")), sharded_copy / "sub" / "x.safetensors")
    target = {"parent": "../x.safetensors", "nested_parent": "sub/../../x.safetensors",
              "absolute": str(outside), "subdir": "sub/x.safetensors"}[kind]
    edit_index(sharded_copy, lambda wm: wm.update({k: target for k, v in wm.items() if v.startswith("model-00001-")}))
    with pytest.raises(BaseCheckpointError, match="outside the checkpoint directory") as ei:
        BaseCheckpoint.open(sharded_copy)
    assert repr(target) in str(ei.value)


@pytest.mark.parametrize("bad", [5, None, ["model-00001-of-00010.safetensors"], ""])
def test_index_shard_not_a_name(sharded_copy: Path, bad: object) -> None:
    edit_index(sharded_copy, lambda wm: wm.update({"lm_head.weight": bad}))
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(sharded_copy)
    assert INDEX_NAME in str(ei.value)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": {}}', '{"metadata": {}}'])
def test_bad_index(sharded_copy: Path, text: str) -> None:
    (sharded_copy / INDEX_NAME).write_text(text)
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(sharded_copy)
    assert INDEX_NAME in str(ei.value)


def test_bad_config(sharded_copy: Path) -> None:
    (sharded_copy / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(sharded_copy)
    assert str(sharded_copy / "config.json") in str(ei.value)


def test_truncated_shard(sharded_copy: Path) -> None:
    victim = sorted(sharded_copy.glob("model-*.safetensors"))[2]
    os.truncate(victim, victim.stat().st_size - 100)
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(sharded_copy)
    assert str(victim) in str(ei.value) and "truncated" in str(ei.value)
    assert ei.value.path == victim
    assert isinstance(ei.value.__cause__, CorruptFileError)


def test_truncated_single_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(ckpts["single"], tmp_path / "ckpt"))
    os.truncate(ckpt / SINGLE_NAME, 5)
    with pytest.raises(BaseCheckpointError) as ei:
        BaseCheckpoint.open(ckpt)
    assert str(ckpt / SINGLE_NAME) in str(ei.value)


# --- a real downloaded checkpoint ---------------------------------------------------------------------------


def test_minilm(minilm_dir: Path) -> None:
    path = minilm_dir
    base = BaseCheckpoint.open(path)
    assert (base.num_layers, base.hidden_size, base.num_attention_heads, base.head_dim) == (6, 384, 12, 32)
    with safe_open(str(path / SINGLE_NAME), framework="pt") as f:
        assert set(base.tensors) == set(f.keys())
        q = "encoder.layer.0.attention.self.query.weight"
        assert base.tensors[q].shape == tuple(f.get_slice(q).get_shape()) == (384, 384)
    t0 = time.perf_counter()
    fp = base.fingerprint()
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"fingerprint took {elapsed:.2f} s"
    assert fp == BaseCheckpoint.open(path).fingerprint()
