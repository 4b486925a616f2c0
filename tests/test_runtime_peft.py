"""The runtime against PEFT: LoRA (rsLoRA, rank/alpha patterns, bias, several active, weighted), IA3, prefixes.

PEFT runs the same adapter directories on a fresh copy of the base; our attachment runs on one model per
test module that every test detaches from again.
"""

from __future__ import annotations

import pytest
import torch
from conftest import input_ids, load_base, save_model
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig

from adapterhub.adapter import Tensors
from adapterhub.compose.blend import stack
from adapterhub.formats import read_adapter, write_adapter
from adapterhub.runtime import Stack, Sum, attach

FP32_TOL = 2e-5


def out_of(result):
    return result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state


def peft_run(base_dir, dirs: dict[str, object], ids, *, active=None, dtype=torch.float32, weighted=None, mask=None,
             **kw):
    """PEFT's output with the adapters ``dirs`` loaded, ``active`` (default: all) active or, with ``weighted``
    = (weights, combination_type), one add_weighted_adapter of them."""
    names = list(dirs)
    model = PeftModel.from_pretrained(load_base(base_dir).to(dtype), dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(dirs[n], adapter_name=n)
    if weighted is not None:
        weights, how = weighted
        model.add_weighted_adapter(names, list(weights), "mix", combination_type=how)
        model.set_adapter("mix")
    elif len(names) > 1:
        model.base_model.set_adapter(active or names)
    model.eval()
    with torch.no_grad():
        return out_of(model(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **kw))


def ours_run(model, tree, ids, mask=None, **options):
    with attach(model, tree, **options), torch.no_grad():
        return out_of(model(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask))


@pytest.fixture(scope="module")
def models(llama_base, minilm_dir):
    cache = {}

    def get(which: str = "llama", dtype: torch.dtype = torch.float32):
        if (which, dtype) not in cache:
            cache[(which, dtype)] = load_base(llama_base if which == "llama" else minilm_dir).to(dtype)
        return cache[(which, dtype)]

    return get


LORA_CONFIGS = {
    "all-linear": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora-patterns": lambda: LoraConfig(r=8, lora_alpha=16, use_rslora=True,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                                          rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 3},
                                          alpha_pattern={"o_proj": 3, "v_proj": 40}),
    "lora-bias": lambda: LoraConfig(r=4, lora_alpha=4, lora_bias=True, target_modules=["q_proj", "down_proj"]),
}


@pytest.mark.parametrize("name", sorted(LORA_CONFIGS))
def test_one_lora_matches_peft(name, llama_base, make_peft, models):
    src = make_peft(llama_base, LORA_CONFIGS[name](), seed=3)
    ids = input_ids()
    want = peft_run(llama_base, {"a": src}, ids)
    got = ours_run(models(), read_adapter(src), ids)
    assert (got - want).abs().max() <= FP32_TOL
    assert (want - ours_run(models(), Sum(read_adapter(src), weights=[0.0]), ids)).abs().max() > 1e-2


def test_minilm_rslora_matches_peft(minilm_dir, make_peft, models):
    cfg = LoraConfig(r=8, lora_alpha=4, use_rslora=True,
                     target_modules=["query", "value", "intermediate.dense", "output.dense"])
    src = make_peft(minilm_dir, cfg, seed=4)
    ids = input_ids(vocab=30000)
    want = peft_run(minilm_dir, {"a": src}, ids)
    assert (ours_run(models("minilm"), read_adapter(src), ids) - want).abs().max() <= FP32_TOL


@pytest.fixture(scope="module")
def three_loras(llama_base, make_peft):
    """Different targets, ranks and scales."""
    return {
        "a": make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 5),
        "b": make_peft(llama_base, LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"]),
                       6),
        "c": make_peft(llama_base, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear",
                                              rank_pattern={"gate_proj": 4}), 7),
    }


def test_several_loras_match_peft_with_them_all_active(three_loras, llama_base, models):
    ids = input_ids()
    want = peft_run(llama_base, three_loras, ids)
    adapters = [read_adapter(p) for p in three_loras.values()]
    assert (ours_run(models(), Sum(*adapters), ids) - want).abs().max() <= FP32_TOL
    # a Stack of LoRAs adds them too
    assert (ours_run(models(), Stack(*adapters), ids) - want).abs().max() <= FP32_TOL


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1.5, -0.5]])
def test_weighted_lora_sum_matches_peft_cat(weights, make_peft, llama_base, models):
    """PEFT's add_weighted_adapter(combination_type="cat") is exactly Σ w_i s_i B_i A_i."""
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    dirs = {"a": make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=targets), 8),
            "b": make_peft(llama_base, LoraConfig(r=2, lora_alpha=8, use_rslora=True, target_modules=targets), 9)}
    ids = input_ids()
    want = peft_run(llama_base, dirs, ids, weighted=(weights, "cat"))
    got = ours_run(models(), Sum(*(read_adapter(p) for p in dirs.values()), weights=weights), ids)
    assert (got - want).abs().max() <= FP32_TOL


@pytest.fixture(scope="module")
def two_ia3(llama_base, make_peft):
    cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return {"a": make_peft(llama_base, IA3Config(**cfg), 10), "b": make_peft(llama_base, IA3Config(**cfg), 11)}


def test_ia3_matches_peft(two_ia3, llama_base, models):
    ids = input_ids()
    a, b = (read_adapter(p) for p in two_ia3.values())
    assert (ours_run(models(), a, ids) - peft_run(llama_base, {"a": two_ia3["a"]}, ids)).abs().max() <= FP32_TOL
    # two IA3 adapters active in PEFT multiply their vectors: Sum with weights 1
    assert (ours_run(models(), Sum(a, b), ids) - peft_run(llama_base, two_ia3, ids)).abs().max() <= FP32_TOL


def test_weighted_ia3_sum_is_the_product_of_powers(two_ia3, llama_base, models, tmp_path):
    """Sum(a, b, weights=[0.5, 2]) runs like one PEFT IA3 adapter whose vectors are v_a ** 0.5 * v_b ** 2."""
    a, b = (read_adapter(p) for p in two_ia3.values())
    mixed = {n: a.tensors[n].double() ** 0.5 * b.tensors[n].double() ** 2 for n in a.tensors}
    oracle = write_adapter(a.replace(tensors=Tensors({n: v.float() for n, v in mixed.items()})), tmp_path / "ab",
                           format="peft")
    ids = input_ids()
    want = peft_run(llama_base, {"ab": oracle}, ids)
    assert (ours_run(models(), Sum(a, b, weights=[0.5, 2]), ids) - want).abs().max() <= FP32_TOL
    assert (ours_run(models(), Sum(a, b, weights=[1, 0]), ids) - ours_run(models(), a, ids)).abs().max() == 0


@pytest.fixture(scope="module")
def prefixes(llama_base, make_peft):
    return {"p5": make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), 12),
            "p3": make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), 13)}


def test_prefix_on_gqa_llama_matches_peft(prefixes, llama_base, models):
    ids = input_ids()
    want = peft_run(llama_base, {"main": prefixes["p5"]}, ids)
    assert (ours_run(models(), read_adapter(prefixes["p5"]), ids) - want).abs().max() <= FP32_TOL
    left_padded = torch.ones_like(ids)
    left_padded[0, :3] = 0
    want = peft_run(llama_base, {"main": prefixes["p5"]}, ids, mask=left_padded)
    got = ours_run(models(), read_adapter(prefixes["p5"]), ids, mask=left_padded)
    assert (got - want)[left_padded.bool()].abs().max() <= FP32_TOL


def test_stacked_prefixes_match_peft_with_the_concatenated_prefix(prefixes, llama_base, models, tmp_path):
    p5, p3 = (read_adapter(p) for p in prefixes.values())
    oracle = write_adapter(stack([p5, p3]).replace(extra={"peft": p5.extra["peft"] | {"num_virtual_tokens": 8}}),
                           tmp_path / "p8", format="peft")
    ids = input_ids()
    want = peft_run(llama_base, {"main": oracle}, ids)
    assert (ours_run(models(), Stack(p5, p3), ids) - want).abs().max() <= FP32_TOL


def test_minilm_prefix_matches_peft(minilm_dir, make_peft, models):
    src = make_peft(minilm_dir, PrefixTuningConfig(num_virtual_tokens=4, task_type="FEATURE_EXTRACTION"), seed=14)
    ids = input_ids(vocab=30000)
    want = peft_run(minilm_dir, {"main": src}, ids)
    got = ours_run(models("minilm"), read_adapter(src), ids)
    assert (got - want).abs().max() <= FP32_TOL
    padded = torch.ones_like(ids)
    padded[1, 4:] = 0
    want = peft_run(minilm_dir, {"main": src}, ids, mask=padded)
    got = ours_run(models("minilm"), read_adapter(src), ids, mask=padded)
    assert (got - want)[padded.bool()].abs().max() <= FP32_TOL
    with torch.no_grad():
        plain = models("minilm")(input_ids=ids).last_hidden_state
    assert (want - plain).abs().max() > 0.05


def test_generation_with_a_prefix_and_lora_matches_peft(prefixes, three_loras, llama_base, models):
    """Greedy decoding through the KV cache: the prefix goes in once, masks and positions follow.

    Every generated token is the argmax of PEFT's forward over the sequence so far. (PEFT 0.21's own
    generate() with a prefix disagrees with its forward after the first new token on transformers 5: it
    numbers the new tokens' positions without the prefix; its forward, which training uses, is the oracle.)
    """
    ids, new = input_ids(), 6
    for src in (prefixes["p5"], three_loras["a"]):
        peft = PeftModel.from_pretrained(load_base(llama_base), src).eval()
        with attach(models(), read_adapter(src)):
            got = models().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                    do_sample=False)
        with torch.no_grad():
            logits = peft(input_ids=got, attention_mask=torch.ones_like(got)).logits
        assert torch.equal(logits.argmax(-1)[:, ids.shape[1] - 1:-1], got[:, ids.shape[1]:])
        if src is three_loras["a"]:
            want = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False)
            assert torch.equal(got, want)


def test_prefix_cache_gives_the_full_forward(prefixes, models):
    """Token by token with the returned cache equals one forward over the whole sequence."""
    model, ids = models(), input_ids()
    with attach(model, read_adapter(prefixes["p5"])), torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        first = model(input_ids=ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), use_cache=True)
        cache = first.past_key_values
        steps = [first.logits]
        for t in range(4, ids.shape[1]):
            o = model(input_ids=ids[:, t:t + 1], attention_mask=torch.ones_like(ids[:, :t + 1]), past_key_values=cache,
                      use_cache=True)
            cache = o.past_key_values
            steps.append(o.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= FP32_TOL


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_llama_family_models_match_peft(model_type, tmp_path, make_peft):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=64)
    torch.manual_seed(0)
    base = save_model(AutoModelForCausalLM.from_config(cfg).eval(), tmp_path / model_type)
    ids = input_ids()
    model = load_base(base)
    for peft_cfg in (LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                     PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")):
        src = make_peft(base, peft_cfg, seed=15)
        assert (ours_run(model, read_adapter(src), ids) - peft_run(base, {"a": src}, ids)).abs().max() <= FP32_TOL


@pytest.mark.parametrize("which", ["lora", "ia3"])
def test_bf16_matches_peft_in_bf16(which, three_loras, two_ia3, llama_base, models):
    """PEFT computes adapters in float32 (autocast_adapter_dtype) and rounds; we compute in the model's bf16."""
    dirs = three_loras if which == "lora" else two_ia3
    ids = input_ids()
    want = peft_run(llama_base, dirs, ids, dtype=torch.bfloat16).float()
    plain = peft_run(llama_base, {"a": next(iter(dirs.values()))}, ids, dtype=torch.float32)
    got = ours_run(models("llama", torch.bfloat16), Sum(*(read_adapter(p) for p in dirs.values())), ids).float()
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 0.02 * want.abs().max()
    assert (want - plain).abs().max() > 0.01


def test_merge_into_a_copy_matches_peft_merge(three_loras, two_ia3, llama_base, models):
    model, ids = models(), input_ids()
    before = {n: (p.data_ptr(), p.clone()) for n, p in model.named_parameters()}
    adapters = [read_adapter(p) for p in three_loras.values()]
    with attach(model, Sum(*adapters), merge=True) as attached, torch.no_grad():
        merged = model(input_ids=ids).logits
        assert "copies of" in attached.summary() and "untouched" in attached.summary()
    want = peft_run(llama_base, three_loras, ids)
    assert (merged - want).abs().max() <= FP32_TOL
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])
    ia3 = [read_adapter(p) for p in two_ia3.values()]
    with attach(model, Sum(*ia3), merge=True), torch.no_grad():
        merged = model(input_ids=ids).logits
    assert (merged - peft_run(llama_base, two_ia3, ids)).abs().max() <= FP32_TOL
