"""Folding adapters into base weights, against PEFT's merge_and_unload and a float64 reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS_LIB, input_ids, load_base, make_llama, save_model
from peft import IA3Config, LoraConfig, PeftModel

from adapterhub.adapter import Adapter, Tensors
from adapterhub.base import BaseCheckpoint
from adapterhub.compose.merge import MergeError, fold, merge_into, merge_state_dict, plan_merge
from adapterhub.errors import CompatibilityError, NonFiniteError
from adapterhub.formats import read_adapter
from adapterhub.tensorfile import load_tensor

CONFIGS = {
    "lora-all-linear-patterns": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"up_proj": 3}),
    "rslora-embedding": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                           target_modules=["embed_tokens", "q_proj", "v_proj"]),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "ia3-feedforward": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"]),
    "ia3-output": lambda: IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=[]),
    "lora-modules-to-save": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                               modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def base(llama_base) -> BaseCheckpoint:
    return BaseCheckpoint.open(llama_base)


@pytest.fixture(scope="module")
def dirs(llama_base, make_peft) -> dict[str, Path]:
    return {name: make_peft(llama_base, make(), seed=i + 20) for i, (name, make) in enumerate(sorted(CONFIGS.items()))}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return input_ids()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def base_tensor(base: BaseCheckpoint, name: str) -> torch.Tensor:
    return load_tensor(base.tensors[name])


def lora_delta(adapter: Adapter, module: str) -> torch.Tensor:
    """s * B @ A in float64, oriented as the base weight (vocab x dim for an embedding)."""
    names = adapter.module_tensors(module)
    if "lora_embedding_A" in names:
        A, B = adapter.tensors[names["lora_embedding_A"]], adapter.tensors[names["lora_embedding_B"]]
        return (B.double() @ A.double()).T * adapter.spec.scale(module)
    A, B = adapter.tensors[names["lora_A"]], adapter.tensors[names["lora_B"]]
    return (B.double() @ A.double()) * adapter.spec.scale(module)


def in_memory(adapter: Adapter, **replace: torch.Tensor) -> Adapter:
    tensors = adapter.tensors.materialize()
    tensors.update(replace)
    return adapter.replace(tensors=Tensors(tensors))


# --- against PEFT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merge_into_equals_peft_merge_and_unload(name, dirs, base, llama_base, ids):
    adapter = read_adapter(dirs[name])
    merged = merge_into(base, [adapter])
    peft_model = PeftModel.from_pretrained(load_base(llama_base), dirs[name]).merge_and_unload().eval()
    theirs = peft_model.state_dict()
    assert sorted(merged) == sorted(theirs) == sorted(base.tensors)
    changed = 0
    for k, t in theirs.items():
        assert merged[k].dtype == t.dtype == torch.float32, k
        torch.testing.assert_close(merged[k], t, rtol=0, atol=1e-6, msg=k)
        changed += not torch.equal(merged[k], base_tensor(base, k))
    assert changed >= 2
    model = load_base(llama_base)
    model.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_folds_are_planned_per_base_tensor(dirs, base):
    lora = read_adapter(dirs["lora-all-linear-patterns"])
    carried = read_adapter(dirs["lora-modules-to-save"])
    plan = plan_merge(base, [lora, carried])
    q = plan.folds["model.layers.0.self_attn.q_proj.weight"]
    assert [(f.adapter, f.role) for f in q] == [(0, "lora"), (1, "lora")]
    assert [(f.adapter, f.role) for f in plan.folds["lm_head.weight"]] == [(1, "replace")]
    assert not plan.touches("model.norm.weight")
    untouched = base_tensor(base, "model.norm.weight")
    assert torch.equal(fold("model.norm.weight", untouched, plan), untouched)
    # applied to tensors already in memory, the plan gives what merge_into gives
    state = {n: load_tensor(info) for n, info in base.tensors.items()}
    in_mem, from_disk = merge_state_dict(state, plan), merge_into(base, [lora, carried])
    assert all(torch.equal(in_mem[n], from_disk[n]) for n in from_disk)


# --- precision: fp32 accumulation, one rounding ------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> BaseCheckpoint:
    path = save_model(make_llama(0, dtype=torch.bfloat16), tmp_path_factory.mktemp("bf16") / "base")
    ckpt = BaseCheckpoint.open(path)
    assert ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "BF16"
    return ckpt


@pytest.fixture(scope="module")
def two_loras(llama_base, make_peft) -> list[Adapter]:
    targets = ["q_proj", "v_proj", "up_proj"]
    return [read_adapter(make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed=s))
            for s in (31, 32)]


def test_bf16_base_is_rounded_once(bf16_base, two_loras):
    weights = [0.8, 0.6]
    merged = merge_into(bf16_base, two_loras, weights)
    once_err = step_err = 0.0
    for m in two_loras[0].modules():
        name = m + ".weight"
        W = base_tensor(bf16_base, name)
        got = merged[name]
        assert got.dtype == torch.bfloat16
        d = [w * lora_delta(a, m) for a, w in zip(two_loras, weights, strict=True)]
        exact = W.double() + d[0] + d[1]
        # computed in fp32 and rounded once: within half a bf16 ulp of the fp32 result (ties aside)
        fp32 = (W.float() + d[0].float() + d[1].float())
        half_ulp = torch.exp2(torch.floor(torch.log2(fp32.abs())) - 8)
        fp32_error = 2**-22 * (W.float().abs() + d[0].float().abs() + d[1].float().abs())  # cancellation
        assert bool(((got.float() - fp32).abs() <= half_ulp + fp32_error).all()), name
        assert float((got == fp32.to(torch.bfloat16)).double().mean()) > 0.99
        # adding in bf16 one adapter at a time rounds twice and is further from the exact sum
        stepwise = ((W.float() + d[0].float()).to(torch.bfloat16).float() + d[1].float()).to(torch.bfloat16)
        once_err += float((got.double() - exact).abs().sum())
        step_err += float((stepwise.double() - exact).abs().sum())
    assert once_err < 0.9 * step_err, (once_err, step_err)
    untouched = "model.layers.0.input_layernorm.weight"
    assert merged[untouched].dtype == torch.bfloat16
    assert torch.equal(merged[untouched], base_tensor(bf16_base, untouched))


def test_two_loras_fold_as_the_weighted_sum(base, two_loras):
    weights = [0.7, -0.3]
    merged = merge_into(base, two_loras, weights)
    for m in two_loras[0].modules():
        name = m + ".weight"
        want = base_tensor(base, name).double() + sum(w * lora_delta(a, m)
                                                      for a, w in zip(two_loras, weights, strict=True))
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=2e-7, msg=name)
    # no weights: all 1
    ones = merge_into(base, two_loras)
    name = "model.layers.1.mlp.up_proj.weight"
    want = base_tensor(base, name).double() + sum(lora_delta(a, "model.layers.1.mlp.up_proj") for a in two_loras)
    torch.testing.assert_close(ones[name].double(), want, rtol=0, atol=2e-7)


def test_merging_does_not_change_in_memory_adapters(dirs, base, llama_base):
    """A saved embedding base layer (``embed_tokens.base_layer.weight``, which PEFT writes with every embedding
    LoRA) replaces the weight before the LoRA delta is added; folding must not add the delta into the
    adapter's own tensor, so merging the same in-memory adapter twice gives the same result."""
    adapter = in_memory(read_adapter(dirs["rslora-embedding"]))
    carried = "model.embed_tokens.base_layer.weight"
    assert adapter.carried() == [carried]
    before = adapter.tensors[carried].clone()
    first = merge_into(base, [adapter])
    assert torch.equal(adapter.tensors[carried], before)
    second = merge_into(base, [adapter])
    assert all(torch.equal(first[n], second[n]) for n in first)


# --- checks and refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused_before_folding(two_loras, base, bad):
    adapter = two_loras[0]
    names = adapter.module_tensors("model.layers.1.self_attn.v_proj")
    B = adapter.tensors[names["lora_B"]].clone()
    B[3, 1] = bad
    broken = in_memory(adapter, **{names["lora_B"]: B})
    with pytest.raises(NonFiniteError) as info:
        merge_into(base, [two_loras[1], broken])
    assert str(info.value) == (
        f"{broken.source}: 1 NaN/Inf value(s) in 1 tensor(s): model.layers.1.self_attn.v_proj.lora_B (1 value).\n"
        "  fix: the adapter's weights are broken (training diverged or the file was damaged); re-export them from a "
        "good checkpoint. Nothing was written.")
    assert info.value.counts == {"model.layers.1.self_attn.v_proj.lora_B": 1}


def test_finite_factors_that_overflow_are_refused_naming_the_tensor(two_loras, base):
    adapter = two_loras[0]
    names = adapter.module_tensors("model.layers.1.self_attn.v_proj")
    A, B = adapter.tensors[names["lora_A"]].clone(), adapter.tensors[names["lora_B"]].clone()
    A[0, :], B[3, 0] = 100.0, 3e38  # each finite in float32; their product is not
    broken = in_memory(adapter, **{names["lora_A"]: A, names["lora_B"]: B})
    with pytest.raises(MergeError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight gives \d+ NaN/Inf") as info:
        merge_into(base, [two_loras[1], broken])
    assert "nothing was written" in str(info.value) and str(broken.source) in str(info.value)


def test_non_finite_base_is_refused(base, two_loras):
    plan = plan_merge(base, two_loras)
    W = base_tensor(base, "model.layers.0.self_attn.q_proj.weight").clone()
    W[0, 0] = float("nan")
    with pytest.raises(MergeError, match="q_proj.weight"):
        fold("model.layers.0.self_attn.q_proj.weight", W, plan)


def test_prefix_cannot_be_folded(base, llama_base, make_peft):
    from peft import PrefixTuningConfig

    prefix = read_adapter(make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")))
    with pytest.raises(MergeError, match="prefix tuning adds virtual tokens and cannot be folded"):
        merge_into(base, [prefix])


def test_bottleneck_cannot_be_folded(base):
    bottleneck = read_adapter(ADAPTERS_LIB / "llama_seq_bn")
    with pytest.raises(MergeError, match="bottleneck adapters add layers and cannot be folded") as info:
        merge_into(base, [bottleneck])
    assert "llama_seq_bn" in str(info.value)


def test_adapter_for_another_base_is_refused(base, make_peft):
    wide = make_llama(0, hidden_size=96)
    adapter = read_adapter(make_peft(None, LoraConfig(r=4, target_modules=["q_proj"]), model=wide))
    with pytest.raises(CompatibilityError, match="INCOMPATIBLE") as info:
        merge_into(base, [adapter])
    assert "shape" in [p.code for p in info.value.report.errors]


def test_adapter_with_another_fingerprint_is_refused(base, llama_other, two_loras):
    from adapterhub.convert import with_base

    other = with_base(two_loras[0], BaseCheckpoint.open(llama_other))
    with pytest.raises(CompatibilityError) as info:
        merge_into(base, [other])
    assert "base-fingerprint" in [p.code for p in info.value.report.errors]
    assert merge_into(base, [with_base(two_loras[0], base)])  # the right base is fine


def test_weighted_ia3_and_mixed_dora_are_refused(dirs, base):
    ia3 = read_adapter(dirs["ia3-output"])
    with pytest.raises(MergeError, match="IA3 adapter folds as a product"):
        merge_into(base, [ia3], [0.5])
    dora, lora = read_adapter(dirs["dora"]), read_adapter(dirs["lora-all-linear-patterns"])
    with pytest.raises(MergeError, match="DoRA adapter renormalises"):
        merge_into(base, [dora, lora])
    with pytest.raises(MergeError, match="weight"):
        merge_into(base, [lora], [1.0, 1.0])


def test_two_ia3_adapters_fold_as_a_product(dirs, base, llama_base, ids):
    a, b = read_adapter(dirs["ia3-feedforward"]), read_adapter(dirs["ia3-output"])
    merged = merge_into(base, [a, b])
    model = PeftModel.from_pretrained(load_base(llama_base), dirs["ia3-feedforward"], adapter_name="a")
    model.load_adapter(dirs["ia3-output"], adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    plain = load_base(llama_base)
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logits(plain, ids), logits(model.eval(), ids), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_folding_in_row_pieces_equals_folding_whole(name, dirs, base):
    """Every fold role works row by row, so a streaming export may fold a huge tensor piece by piece."""
    plan = plan_merge(base, [read_adapter(dirs[name])])
    pieced = 0
    for target in plan.folds:
        w = base_tensor(base, target)
        whole = fold(target, w, plan)
        if w.dim() != 2:
            continue
        for step in (1, 5, w.shape[0]):
            bounds = [(r, min(r + step, w.shape[0])) for r in range(0, w.shape[0], step)]
            pieces = [fold(target, w[a:b], plan, rows=(a, b)) for a, b in bounds]
            torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=1e-6, msg=f"{target} step {step}")
        pieced += 1
    assert pieced >= 2
    target = next(t for t in plan.folds if base.tensors[t].shape[0] > 3)
    with pytest.raises(MergeError, match="rows"):
        fold(target, base_tensor(base, target)[:3], plan, rows=(0, 2))


# --- LoRA and IA3 on one module: one order, whatever order the sources come in --------------------------


def test_lora_and_ia3_on_one_module_fold_the_same_in_either_order(dirs, base, llama_base, minilm_dir, make_peft):
    """LoRA deltas add first, IA3 vectors scale after: (W + dW) * l, as merging the LoRA with PEFT and then the
    IA3 adapter into that merged model gives."""
    lora = read_adapter(dirs["lora-all-linear-patterns"])  # every linear layer of both layers
    for name in ("ia3-feedforward", "ia3-output"):  # scaling the input of down_proj / the output of q, up
        ia3 = read_adapter(dirs[name])
        assert set(ia3.modules()) & set(lora.modules())
        first, second = merge_into(base, [lora, ia3]), merge_into(base, [ia3, lora])
        assert all(torch.equal(first[k], second[k]) for k in first)
        model = load_base(llama_base)
        for d in (dirs["lora-all-linear-patterns"], dirs[name]):
            model = PeftModel.from_pretrained(model, d).merge_and_unload()
        theirs = model.state_dict()
        for k, t in theirs.items():
            torch.testing.assert_close(first[k], t, rtol=0, atol=1e-6, msg=k)
    # with biases: an output-side vector scales the bias after the LoRA bias is added
    bias_lora = read_adapter(make_peft(minilm_dir, LoraConfig(r=2, target_modules=["query"], lora_bias=True), seed=5))
    bias_ia3 = read_adapter(make_peft(minilm_dir, IA3Config(target_modules=["query"], feedforward_modules=[]), seed=6))
    minilm = BaseCheckpoint.open(minilm_dir)
    first, second = merge_into(minilm, [bias_lora, bias_ia3]), merge_into(minilm, [bias_ia3, bias_lora])
    assert all(torch.equal(first[k], second[k]) for k in first)
    model = load_base(minilm_dir)
    for a in (bias_lora, bias_ia3):
        model = PeftModel.from_pretrained(model, a.source).merge_and_unload()
    for k, t in model.state_dict().items():
        if k in first:
            torch.testing.assert_close(first[k], t, rtol=0, atol=1e-6, msg=k)
