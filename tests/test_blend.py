"""Blending and stacking adapters, each LoRA method against an oracle.

Oracles: a dense float64 reference (sum_i w_i s_i B_i A_i) where PEFT is wrong (its ``linear`` adds A and
B separately and creates cross terms), PEFT's ``add_weighted_adapter`` where it is right (``cat``,
``svd`` of non-rsLoRA inputs), PEFT's ``merge_utils`` for the dense task-arithmetic kernels, and PEFT
itself loading what we write.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS_LIB, input_ids, load_base, make_llama
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from safetensors import safe_open

from adapterhub.adapter import Adapter, Tensors
from adapterhub.base import BaseCheckpoint
from adapterhub.compose.blend import METHODS, BlendError, blend, stack
from adapterhub.compose.merge import merge_into
from adapterhub.convert import with_base
from adapterhub.errors import CompatibilityError
from adapterhub.formats import read_adapter, write_adapter

LORA_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SEEDED_METHODS = ("dare_linear", "dare_ties")

CONFIGS = {
    # different ranks and different target sets (q+v / q+up)
    "r2_qv": (lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), 1),
    "r8_qup": (lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj"]), 2),
    # a same-rank, same-target pair (what PEFT's linear/ties need)
    "c4": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 3),
    "d4": (lambda: LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), 4),
    "rslora": (lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj"]), 5),
    "pattern": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                   rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6},
                                   alpha_pattern={"layers.1.self_attn.q_proj": 16, "v_proj": 3}), 6),
    "emb4": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), 7),
    "emb2": (lambda: LoraConfig(r=2, lora_alpha=8, target_modules=["embed_tokens"]), 8),
    "ia3_a": (lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
              9),
    "ia3_b": (lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), 10),
    "prefix5a": (lambda: PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), 11),
    "prefix5b": (lambda: PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), 12),
    "prefix3": (lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), 13),
}


@pytest.fixture(scope="module")
def dirs(llama_base, make_peft) -> dict[str, Path]:
    return {name: make_peft(llama_base, make(), seed=seed) for name, (make, seed) in CONFIGS.items()}


@pytest.fixture(scope="module")
def ads(dirs) -> dict[str, Adapter]:
    """Every fixture adapter read once, with its tensors in memory. PEFT saves the (unchanged) base embedding
    layer beside an embedding LoRA; it is dropped here (see test_peft_embedding_lora_blends_as_saved)."""
    return {name: without_carried(in_memory(read_adapter(d))) for name, d in dirs.items()}


def in_memory(adapter: Adapter, dtype: torch.dtype | None = None) -> Adapter:
    tensors = {n: (t if dtype is None else t.to(dtype)) for n, t in adapter.tensors.materialize().items()}
    return adapter.replace(tensors=Tensors(tensors))


def without_carried(adapter: Adapter) -> Adapter:
    carried = set(adapter.carried())
    return adapter.replace(tensors=Tensors({n: adapter.tensors.entry(n) for n in adapter.tensors if n not in carried}))


# --- the dense float64 reference -------------------------------------------------------------------


def delta(adapter: Adapter, module: str) -> torch.Tensor:
    """B @ A * scale in float64 (out x in; for an embedding LoRA dim x vocab)."""
    names = adapter.module_tensors(module)
    role = "lora_embedding_" if "lora_embedding_A" in names else "lora_"
    A, B = adapter.tensors[names[role + "A"]].double(), adapter.tensors[names[role + "B"]].double()
    return (B @ A) * adapter.spec.scale(module)


def deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {m: delta(adapter, m) for m in adapter.modules()}


def exact_sum(adapters: list[Adapter], weights: list[float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights, strict=True):
        for m, d in deltas(a).items():
            out[m] = out[m] + w * d if m in out else w * d
    return out


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of x against ref."""
    return float(torch.linalg.matrix_norm(x.double() - ref.double()) / torch.linalg.matrix_norm(ref.double()))


def assert_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    assert sorted(got) == sorted(want)
    for m in want:
        assert got[m].shape == want[m].shape, m
        err = rel(got[m], want[m]) if want[m].norm() > 0 else float(got[m].norm())
        assert err <= tol, (m, err)


def assert_scale_one_and_ranks_match(result: Adapter) -> None:
    """Every module of a LoRA blend has scale 1, and the config's ranks are the tensors' ranks."""
    for m in result.modules():
        assert result.spec.scale(m) == 1.0, m
        assert result.spec.rank(m) == result.lora_rank(m), m


# --- PEFT as the oracle ------------------------------------------------------------------------------


def peft_weighted(base_dir: Path, adapter_dirs: list[Path], weights: list[float], combination_type: str,
                  **kwargs) -> dict[str, torch.Tensor]:
    """Per-module delta (our orientation, float64) of PEFT's add_weighted_adapter result."""
    model = PeftModel.from_pretrained(load_base(base_dir), adapter_dirs[0], adapter_name="a0")
    names = ["a0"]
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
        names.append(f"a{i}")
    model.add_weighted_adapter(names, weights, "out", combination_type=combination_type, **kwargs)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ("out" in module.lora_A or "out" in module.lora_embedding_A):
            d = module.get_delta_weight("out").double()
            out[name.removeprefix("base_model.model.")] = d.T if "out" in module.lora_embedding_A else d
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def merged_logits(base_dir: Path, adapter: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """The base with the adapter folded in by adapterhub, run by transformers."""
    model = load_base(base_dir)
    model.load_state_dict(merge_into(BaseCheckpoint.open(base_dir), [adapter]), strict=True)
    return logits(model, ids)


def peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(load_base(base_dir), adapter_dir).eval(), ids)


# --- linear / cat: exact sums ------------------------------------------------------------------------

PAIRS = {
    "ranks-2-8-and-targets": ("r2_qv", "r8_qup"),
    "rslora-and-plain": ("rslora", "c4"),
    "patterns-and-plain": ("pattern", "r8_qup"),
    "embedding": ("emb4", "emb2"),
}


@pytest.mark.parametrize("method", ["linear", "cat"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.5, -0.8)], ids=["pos", "neg"])
def test_linear_and_cat_are_the_exact_weighted_sum(ads, method, pair, weights):
    adapters = [ads[n] for n in PAIRS[pair]]
    result = blend(adapters, list(weights), method)
    assert result.kind == "lora" and result.extra["blend"]["method"] == method
    assert result.extra["blend"]["weights"] == list(weights)
    assert_deltas(deltas(result), exact_sum(adapters, list(weights)), 1e-6)
    assert_scale_one_and_ranks_match(result)
    # rank = sum of the ranks of the inputs that touch the module; nothing truncated
    for m in result.modules():
        assert result.lora_rank(m) == sum(a.lora_rank(m) for a in adapters if m in a.modules()), m
    assert result.extra["blend"]["relative_error"] == {}


def test_peft_linear_has_cross_terms_ours_does_not(ads, dirs, llama_base):
    """PEFT's linear forms (sum sqrt(w s) B_i)(sum sqrt(w s) A_i): cross terms B_i A_j (peft#3004)."""
    names, weights = ["c4", "d4"], [0.5, 0.5]
    exact = exact_sum([ads[n] for n in names], weights)
    theirs = peft_weighted(llama_base, [dirs[n] for n in names], weights, "linear")
    assert sorted(theirs) == sorted(exact)
    assert all(rel(theirs[m], exact[m]) > 0.3 for m in exact), {m: rel(theirs[m], exact[m]) for m in exact}
    ours = blend([ads[n] for n in names], weights, "linear")
    assert_deltas(deltas(ours), exact, 1e-6)


def test_peft_embedding_lora_blends_as_saved(dirs, llama_base, tmp_path, ids):
    """PEFT writes ``embed_tokens.base_layer.weight`` (a copy of the base's embedding) with every LoRA that
    targets an embedding; such adapters, as saved, must blend (the copy is the base's, not trained)."""
    adapters = [read_adapter(dirs["emb4"]), read_adapter(dirs["emb2"])]
    assert adapters[0].carried() == ["model.embed_tokens.base_layer.weight"]
    result = blend(adapters, [0.5, -1.0], "linear")
    assert_deltas(deltas(result), exact_sum(adapters, [0.5, -1.0]), 1e-6)
    out = write_adapter(result, tmp_path / "emb")
    torch.testing.assert_close(peft_logits(llama_base, out, ids), merged_logits(llama_base, result, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair", ["ranks-2-8-and-targets", "patterns-and-plain", "embedding"])
def test_cat_matches_peft(ads, dirs, llama_base, pair):
    names, weights = PAIRS[pair], [0.7, -0.4]
    theirs = peft_weighted(llama_base, [dirs[n] for n in names], weights, "cat")
    ours = deltas(blend([ads[n] for n in names], weights, "cat"))
    assert_deltas(ours, theirs, 1e-5)
    # and PEFT's cat is the exact sum here (non-rsLoRA inputs)
    assert_deltas(theirs, exact_sum([ads[n] for n in names], weights), 1e-5)


# --- svd ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pair", "k"), [("ranks-2-8-and-targets", 3), ("patterns-and-plain", 4),
                                         ("rslora-and-plain", 2), ("embedding", 3)])
def test_svd_is_the_best_rank_k_approximation(ads, pair, k):
    adapters, weights = [ads[n] for n in PAIRS[pair]], [0.6, -0.9]
    result = blend(adapters, weights, "svd", rank=k)
    exact = exact_sum(adapters, weights)
    got = deltas(result)
    assert sorted(got) == sorted(exact)
    assert_scale_one_and_ranks_match(result)
    assert result.extra["blend"]["rank"] == k
    recorded = result.extra["blend"]["relative_error"]
    assert sorted(recorded) == sorted(exact)
    truncated = 0
    for m, D in exact.items():
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        optimal = math.sqrt(float(S[k:].square().sum()) / float(S.square().sum()))  # Eckart-Young
        actual = rel(got[m], D)
        assert abs(actual - optimal) <= 1e-6, (m, actual, optimal)
        assert abs(recorded[m] - actual) <= 1e-6, (m, recorded[m], actual)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert rel(got[m], best) <= 1e-5, m
        rank_in = sum(a.lora_rank(m) for a in adapters if m in a.modules())
        assert result.lora_rank(m) == min(k, rank_in), m
        truncated += optimal > 1e-3
    assert truncated > 0  # the test really truncates somewhere


@pytest.mark.parametrize(("names", "k"), [(("c4", "d4"), 3), (("r2_qv", "r8_qup"), 4), (("emb4", "emb2"), 3)])
def test_svd_matches_peft_svd(ads, dirs, llama_base, names, k):
    """PEFT's svd is the SVD of the same dense sum (right when the inputs are not rsLoRA); float32 there."""
    weights = [0.7, 0.3]
    theirs = peft_weighted(llama_base, [dirs[n] for n in names], weights, "svd", svd_rank=k)
    ours = deltas(blend([ads[n] for n in names], weights, "svd", rank=k))
    assert_deltas(ours, theirs, 1e-4)


def test_svd_default_rank_is_the_largest_input_rank(ads):
    result = blend([ads["r2_qv"], ads["r8_qup"]], [1.0, 1.0], "svd")
    assert result.extra["blend"]["rank"] == 8
    assert result.lora_rank("model.layers.0.self_attn.q_proj") == 8   # 2 + 8 truncated to 8
    assert result.lora_rank("model.layers.0.self_attn.v_proj") == 2   # only rank 2 to begin with


# --- ties / dare / magnitude pruning -------------------------------------------------------------------


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_methods_are_deterministic(ads, method):
    adapters, weights = [ads["c4"], ads["d4"]], [0.7, 0.5]
    seed = (lambda s: {"seed": s}) if method in SEEDED_METHODS else (lambda s: {})
    one = blend(adapters, weights, method, rank=4, density=0.5, **seed(3))
    two = blend(adapters, weights, method, rank=4, density=0.5, **seed(3))
    other = blend(adapters, weights, method, rank=4, density=0.5, **seed(4))
    assert sorted(one.tensors) == sorted(two.tensors) == sorted(other.tensors)
    assert all(torch.equal(one.tensors[n], two.tensors[n]) for n in one.tensors)
    differs = [n for n in one.tensors if not torch.equal(one.tensors[n], other.tensors[n])]
    if method in SEEDED_METHODS:
        assert len(differs) == len(one.tensors)  # every module draws its own mask from the seed
        assert one.extra["blend"]["seed"] == 3
    else:  # nothing random: these methods take no seed at all (a seed would be silently ignored)
        assert differs == []
        with pytest.raises(BlendError, match=f"blend method '{method}' takes no option\\(s\\) seed"):
            blend(adapters, weights, method, seed=3)
    assert one.extra["blend"]["density"] == 0.5


@pytest.mark.parametrize("method", LORA_METHODS)
def test_weights_one_zero_return_input_zero(ads, method):
    """[1, 0] gives input 0's delta (dense methods at density 1, rank = input 0's rank); the other input's
    modules come out zero."""
    first, second = ads["r2_qv"], ads["r8_qup"]
    options = {} if method in ("linear", "cat") else {"rank": 2}
    if method in DENSE_METHODS:
        options.update(density=1.0, **({"seed": 5} if method in SEEDED_METHODS else {}))
    result = blend([first, second], [1.0, 0.0], method, **options)
    got, want = deltas(result), deltas(first)
    assert sorted(got) == sorted(set(want) | set(second.modules()))
    for m, d in got.items():
        if m in want:
            assert rel(d, want[m]) <= 1e-6, (m, rel(d, want[m]))
        else:
            assert float(d.abs().max()) == 0.0, m


@pytest.mark.parametrize("method", LORA_METHODS)
def test_order_invariance(ads, method):
    a, b, weights = ads["pattern"], ads["r8_qup"], [0.8, -0.6]
    options = {} if method in ("linear", "cat") else {"rank": 4}
    if method in DENSE_METHODS:  # dare draws masks per input in order: compare at density 1
        options.update(density=1.0, seed=1) if method in SEEDED_METHODS else options.update(density=0.4)
    ab = blend([a, b], weights, method, **options)
    ba = blend([b, a], weights[::-1], method, **options)
    assert_deltas(deltas(ab), deltas(ba), 1e-6)


def test_magnitude_prune_equals_peft_merge_utils(ads):
    """At full rank the re-factoring is exact: our delta is PEFT's magnitude_prune of the same dense deltas."""
    adapters, weights, density = [ads["c4"], ads["d4"]], [0.7, -0.4], 0.3
    result = blend(adapters, weights, "magnitude_prune", rank=64, density=density)
    got = deltas(result)
    for m in adapters[0].modules():
        want = merge_utils.magnitude_prune([delta(a, m) for a in adapters], torch.tensor(weights, dtype=torch.float64),
                                           density)
        assert rel(got[m], want) <= 1e-5, m
        assert result.extra["blend"]["relative_error"][m] <= 1e-12


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, -0.4)], ids=["equal", "signed"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_is_peft_ties_of_the_weighted_task_vectors(ads, weights, sign):
    """TIES on task vectors w_i * delta_i (a negative weight negates the task before the sign election);
    with equal positive weights that is exactly PEFT's ties."""
    adapters, density = [ads["c4"], ads["d4"]], 0.4
    got = deltas(blend(adapters, list(weights), "ties", rank=64, density=density, majority_sign_method=sign))
    for m in adapters[0].modules():
        tasks = [w * delta(a, m) for a, w in zip(adapters, weights, strict=True)]
        want = merge_utils.ties(tasks, torch.ones(2, dtype=torch.float64), density, sign)
        assert rel(got[m], want) <= 1e-5, m
        if weights == (1.0, 1.0):
            plain = merge_utils.ties([delta(a, m) for a in adapters], torch.tensor(weights, dtype=torch.float64),
                                     density, sign)
            assert rel(got[m], plain) <= 1e-5, m


def test_dare_linear_drops_at_the_given_density_and_rescales(ads):
    p = 0.3
    first, second = ads["c4"], ads["d4"]
    result = blend([first, second], [1.0, 0.0], "dare_linear", rank=64, density=p, seed=7)
    for m in first.modules():
        d, got = delta(first, m), delta(result, m)
        tol = 1e-4 * float(d.abs().max())
        kept = (got - d / p).abs() <= tol
        dropped = got.abs() <= tol
        assert bool((kept | dropped).all()), m  # every entry is either dropped or rescaled by 1/p
        significant = d.abs() > 10 * tol / p
        fraction = float(kept[significant].double().mean())
        assert abs(fraction - p) < 0.05, (m, fraction)


def test_dense_method_options_are_checked(ads):
    adapters = [ads["c4"], ads["d4"]]
    for bad in (0.0, 1.5):
        with pytest.raises(BlendError, match="density"):
            blend(adapters, [1, 1], "ties", density=bad)
    with pytest.raises(BlendError, match="majority_sign_method"):
        blend(adapters, [1, 1], "ties", majority_sign_method="median")
    with pytest.raises(BlendError, match="option rank of blend method 'svd' is 0, out of range"):
        blend(adapters, [1, 1], "svd", rank=0)


# --- what we write reloads in PEFT ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return input_ids()


@pytest.mark.parametrize("method", LORA_METHODS)
def test_every_lora_method_reloads_in_peft(ads, llama_base, method, tmp_path, ids):
    """rank_pattern/alpha_pattern/rsLoRA inputs of different ranks; the written result loads in PEFT with no
    size mismatch and gives the base plus exactly our delta."""
    adapters = [ads["pattern"], ads["r8_qup"], ads["rslora"]]
    options = {} if method in ("linear", "cat") else {"rank": 3}
    if method in DENSE_METHODS:
        options.update(density=0.5, **({"seed": 1} if method in SEEDED_METHODS else {}))
    result = blend(adapters, [0.6, 0.4, -0.5], method, **options)
    if method not in DENSE_METHODS:  # dense re-factoring gives every module rank 3
        assert len({result.lora_rank(m) for m in result.modules()}) > 1 and result.spec.rank_pattern
    out = write_adapter(result, tmp_path / method)
    reread = read_adapter(out)
    assert_deltas(deltas(reread), deltas(result), 0.0)
    theirs = peft_logits(llama_base, out, ids)
    ours = merged_logits(llama_base, result, ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - logits(load_base(llama_base), ids)).abs().max() > 1e-3  # the blend does something


def test_embedding_svd_blend_reloads_in_peft(ads, llama_base, tmp_path, ids):
    result = blend([ads["emb4"], ads["emb2"]], [0.5, 1.0], "svd", rank=3)
    out = write_adapter(result, tmp_path / "emb")
    torch.testing.assert_close(peft_logits(llama_base, out, ids), merged_logits(llama_base, result, ids),
                               rtol=1e-5, atol=1e-5)


def test_lora_stack_is_peft_with_both_adapters_active(ads, dirs, llama_base, tmp_path, ids):
    stacked = stack([ads["pattern"], ads["r8_qup"]])
    assert_deltas(deltas(stacked), exact_sum([ads["pattern"], ads["r8_qup"]], [1.0, 1.0]), 1e-6)
    model = PeftModel.from_pretrained(load_base(llama_base), dirs["pattern"], adapter_name="a")
    model.load_adapter(dirs["r8_qup"], adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(peft_logits(llama_base, write_adapter(stacked, tmp_path / "s"), ids),
                               logits(model.eval(), ids), rtol=1e-5, atol=1e-5)


# --- dtypes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", LORA_METHODS)
def test_bf16_in_bf16_out(ads, method):
    adapters = [in_memory(ads["c4"], torch.bfloat16), in_memory(ads["r8_qup"], torch.bfloat16)]
    options = {} if method in ("linear", "cat") else {"rank": 4}
    if method in DENSE_METHODS:
        options.update(density=0.5, **({"seed": 2} if method in SEEDED_METHODS else {}))
    result = blend(adapters, [0.5, 0.5], method, **options)
    assert {t.dtype for t in result.tensors.values()} == {torch.bfloat16}
    # the same values in float32 give the same blend up to the final rounding to bf16
    reference = blend([in_memory(a, torch.float32) for a in adapters], [0.5, 0.5], method, **options)
    assert {t.dtype for t in reference.tensors.values()} == {torch.float32}
    assert_deltas(deltas(result), deltas(reference), 1e-2)


def test_mixed_dtypes_blend_in_float32(ads):
    result = blend([in_memory(ads["c4"], torch.bfloat16), ads["d4"]], [0.5, 0.5], "linear")
    assert {t.dtype for t in result.tensors.values()} == {torch.float32}


def test_ia3_and_prefix_keep_bf16(ads):
    ia3 = blend([in_memory(ads["ia3_a"], torch.bfloat16), in_memory(ads["ia3_b"], torch.bfloat16)], [0.5, 0.5])
    prefix = blend([in_memory(ads["prefix5a"], torch.bfloat16), in_memory(ads["prefix5b"], torch.bfloat16)],
                   [0.5, 0.5])
    assert {t.dtype for t in ia3.tensors.values()} == {torch.bfloat16}
    assert prefix.tensors["prompt_embeddings"].dtype == torch.bfloat16


# --- IA3, prefix, bottleneck -------------------------------------------------------------------------


def test_ia3_linear_is_the_weighted_sum_of_vectors(ads):
    a, b, weights = ads["ia3_a"], ads["ia3_b"], [0.7, 0.6]
    result = blend([a, b], weights)
    assert result.kind == "ia3"
    assert sorted(result.tensors) == sorted(set(a.tensors) | set(b.tensors))
    shared = sorted(set(a.tensors) & set(b.tensors))
    assert len(shared) == 4  # k_proj, down_proj in two layers; v_proj is a's only (see the next test)
    for name in shared:
        want = 0.7 * a.tensors[name].double() + 0.6 * b.tensors[name].double()
        assert result.tensors[name].dtype == torch.float32
        torch.testing.assert_close(result.tensors[name], want.float(), rtol=1e-6, atol=0)
    down = "model.layers.0.mlp.down_proj"
    assert result.spec.is_feedforward(down) and not result.spec.is_feedforward("model.layers.0.self_attn.k_proj")


def test_ia3_module_an_input_does_not_scale_counts_as_identity(ads, llama_base):
    """An IA3 adapter that does not target a module leaves it unscaled: its vector there is all ones, not zeros.
    So [0, 1] gives input 1 (not a v_proj scaled to zero), and [0.25, 0.75] gives 0.25 v + 0.75 there."""
    a, b = ads["ia3_a"], ads["ia3_b"]
    v = "model.layers.0.self_attn.v_proj.ia3_l"
    assert v in a.tensors and v not in b.tensors
    mixed = blend([a, b], [0.25, 0.75])
    torch.testing.assert_close(mixed.tensors[v], (0.25 * a.tensors[v].double() + 0.75).float(), rtol=1e-6, atol=0)
    base = BaseCheckpoint.open(llama_base)
    only_b, b_alone = merge_into(base, [blend([a, b], [0.0, 1.0])]), merge_into(base, [b])
    for name, t in b_alone.items():
        torch.testing.assert_close(only_b[name], t, rtol=1e-6, atol=0, msg=name)


def test_ia3_stack_is_the_elementwise_product_and_peft_with_both_active(ads, dirs, llama_base, tmp_path, ids):
    a, b = ads["ia3_a"], ads["ia3_b"]
    stacked = stack([a, b])
    for name, got in stacked.tensors.items():
        want = a.tensors[name].double() if name in a.tensors else torch.ones(1, dtype=torch.float64)
        want = want * (b.tensors[name].double() if name in b.tensors else 1.0)
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    model = PeftModel.from_pretrained(load_base(llama_base), dirs["ia3_a"], adapter_name="a")
    model.load_adapter(dirs["ia3_b"], adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(peft_logits(llama_base, write_adapter(stacked, tmp_path / "s"), ids),
                               logits(model.eval(), ids), rtol=1e-5, atol=1e-5)


def test_prefix_linear_is_the_weighted_average(ads, llama_base, tmp_path):
    a, b, weights = ads["prefix5a"], ads["prefix5b"], [0.25, 0.75]
    result = blend([a, b], weights)
    want = 0.25 * a.tensors["prompt_embeddings"].double() + 0.75 * b.tensors["prompt_embeddings"].double()
    torch.testing.assert_close(result.tensors["prompt_embeddings"], want.float(), rtol=1e-6, atol=0)
    assert result.spec.num_virtual_tokens == 5
    model = PeftModel.from_pretrained(load_base(llama_base), write_adapter(result, tmp_path / "p"))
    loaded = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(loaded, result.tensors["prompt_embeddings"])


def test_prefix_stack_concatenates_virtual_tokens(ads, llama_base, tmp_path):
    a, b = ads["prefix5a"], ads["prefix3"]
    result = stack([a, b])
    want = torch.cat([a.tensors["prompt_embeddings"], b.tensors["prompt_embeddings"]])
    assert torch.equal(result.tensors["prompt_embeddings"], want)
    assert result.spec.num_virtual_tokens == 8 and result.spec.width == a.spec.width
    model = PeftModel.from_pretrained(load_base(llama_base), write_adapter(result, tmp_path / "p"))
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, want)


def test_prefix_length_mismatch_is_refused_in_blend(ads):
    with pytest.raises(CompatibilityError, match="virtual tokens") as info:
        blend([ads["prefix5a"], ads["prefix3"]], [0.5, 0.5])
    assert [p.code for p in info.value.report.errors] == ["prefix-length"]


@pytest.fixture(scope="module")
def bottleneck() -> Adapter:
    return in_memory(read_adapter(ADAPTERS_LIB / "minilm_seq_bn"))


def test_bottleneck_blend_with_itself_is_itself(bottleneck):
    result = blend([bottleneck, bottleneck], [0.5, 0.5])
    assert result.kind == "bottleneck" and result.spec == bottleneck.spec
    assert sorted(result.tensors) == sorted(bottleneck.tensors)
    assert all(torch.equal(result.tensors[n], bottleneck.tensors[n]) for n in bottleneck.tensors)
    doubled = bottleneck.replace(tensors=Tensors({n: 2 * t for n, t in bottleneck.tensors.items()}))
    mix = blend([bottleneck, doubled], [0.25, 0.75])
    for n, t in bottleneck.tensors.items():
        torch.testing.assert_close(mix.tensors[n], 1.75 * t, rtol=1e-6, atol=0)


def test_bottleneck_and_prefix_averages_normalise_the_weights(bottleneck, ads):
    """As the `adapters` library's average_adapter (normalize_weights=True): blend([a, a]) is a, not 2a."""
    same = blend([bottleneck, bottleneck])
    assert all(torch.equal(same.tensors[n], bottleneck.tensors[n]) for n in bottleneck.tensors)
    doubled = bottleneck.replace(tensors=Tensors({n: 2 * t for n, t in bottleneck.tensors.items()}))
    mix = blend([bottleneck, doubled], [2, 1])  # = 2/3 a + 1/3 (2a)
    assert mix.extra["blend"]["normalized_weights"] == [2 / 3, 1 / 3]
    for n, t in bottleneck.tensors.items():
        torch.testing.assert_close(mix.tensors[n], (4 / 3) * t, rtol=1e-6, atol=0)
    p = ads["prefix5a"]
    assert torch.equal(blend([p, p], [1, 1]).tensors["prompt_embeddings"], p.tensors["prompt_embeddings"])
    for pair in ([bottleneck, doubled], [p, ads["prefix5b"]]):
        with pytest.raises(BlendError) as info:
            blend(pair, [1, -1])
        assert str(info.value) == ("weights [1.0, -1.0] sum to 0, so they cannot be normalised into an average; "
                                   "bottleneck and prefix blends average their inputs with weights that sum to 1.")


def test_bottleneck_stack_is_refused_as_run_time_only(bottleneck):
    with pytest.raises(CompatibilityError, match="run time") as info:
        stack([bottleneck, bottleneck])
    assert "bottleneck-stack" in [p.code for p in info.value.report.errors]
    with pytest.raises(BlendError, match="does not blend bottleneck"):
        blend([bottleneck, bottleneck], [0.5, 0.5], "svd")


# --- refusals ------------------------------------------------------------------------------------------


def test_lora_and_ia3_do_not_mix(ads):
    with pytest.raises(CompatibilityError) as info:
        blend([ads["c4"], ads["ia3_a"]], [0.5, 0.5])
    assert [p.code for p in info.value.report.errors] == ["kind-mismatch"]
    with pytest.raises(CompatibilityError):
        stack([ads["ia3_a"], ads["c4"]])


def test_adapters_on_different_bases_are_refused(ads, llama_base, llama_other):
    here, there = BaseCheckpoint.open(llama_base), BaseCheckpoint.open(llama_other)
    a, b = with_base(ads["c4"], here), with_base(ads["d4"], there)
    for method in ("linear", "svd"):
        with pytest.raises(CompatibilityError, match="different base weights") as info:
            blend([a, b], [0.5, 0.5], method)
        assert "base-fingerprint" in [p.code for p in info.value.report.errors]
    same = blend([a, with_base(ads["d4"], here)], [0.5, 0.5])
    assert same.base.fingerprint == here.fingerprint()


def test_adapters_for_other_dimensions_are_refused(ads, make_peft):
    wide = read_adapter(make_peft(None, LoraConfig(r=4, target_modules=["q_proj"]),
                                  model=make_llama(0, hidden_size=96)))
    with pytest.raises(CompatibilityError) as info:
        blend([ads["c4"], wide], [0.5, 0.5], "cat")
    assert "shape" in [p.code for p in info.value.report.errors]


def test_dora_and_carried_modules_are_refused(llama_base, make_peft):
    dora = read_adapter(make_peft(llama_base, LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])))
    with pytest.raises(CompatibilityError, match="DoRA"):
        blend([dora, dora], [0.5, 0.5])
    carried = read_adapter(make_peft(llama_base, LoraConfig(r=2, target_modules=["q_proj"],
                                                            modules_to_save=["lm_head"])))
    with pytest.raises(BlendError, match="modules_to_save"):
        blend([carried, carried], [0.5, 0.5])


def test_bad_method_options_and_weights(ads):
    pair = [ads["c4"], ads["d4"]]
    with pytest.raises(BlendError, match="unknown blend method 'average'") as info:
        blend(pair, [0.5, 0.5], "average")
    assert all(name in str(info.value) for name in METHODS)
    with pytest.raises(BlendError, match="takes no option"):
        blend(pair, [0.5, 0.5], "linear", rank=4)
    with pytest.raises(BlendError, match="takes no option"):
        blend(pair, [0.5, 0.5], "svd", density=0.5)
    with pytest.raises(BlendError, match="one weight per adapter"):
        blend(pair, [1.0], "linear")
    with pytest.raises(BlendError, match="finite"):
        blend(pair, [float("nan"), 1.0], "linear")
    with pytest.raises(BlendError, match="at least one"):
        blend([], [], "linear")
    with pytest.raises(BlendError, match="does not blend ia3"):
        blend([ads["ia3_a"], ads["ia3_b"]], [0.5, 0.5], "svd")
    assert sorted(METHODS) == sorted(LORA_METHODS)


# --- recipes and the CLI -------------------------------------------------------------------------------


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_files(a: Path, b: Path) -> None:
    ta, tb = file_tensors(a / "adapter_model.safetensors"), file_tensors(b / "adapter_model.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_cli_recipe_reproduces_a_pushed_blend_bit_for_bit(registry_cli, dirs, tmp_path):
    pushed = {}
    for src, target in (("c4", "team/a"), ("r8_qup", "team/b")):
        r = registry_cli("push", dirs[src], target)
        assert r.exit_code == 0, r.output
        pushed[target] = r.output.strip().splitlines()[-1].split()
    recipe_file = tmp_path / "r.json"
    r = registry_cli("blend", "team/a", "team/b", "--weights", "0.7,0.3", "--method", "svd", "--rank", "4",
            "--push", "team/x", "--save-recipe", recipe_file)
    assert r.exit_code == 0, r.output
    assert "truncation: relative error max" in r.output
    assert r.output.strip().splitlines()[-1].startswith("team/x@1 sha256:")
    recipe = json.loads(recipe_file.read_text())
    assert recipe["method"] == "svd" and recipe["options"] == {"rank": 4} and recipe["weights"] == [0.7, 0.3]
    assert recipe["sources"] == [{"ref": ref, "digest": digest} for ref, digest in pushed.values()]

    r = registry_cli("blend", "--recipe", recipe_file, "-o", tmp_path / "again")
    assert r.exit_code == 0, r.output
    r = registry_cli("pull", "team/x", "-o", tmp_path / "pulled", "--format", "peft")
    assert r.exit_code == 0, r.output
    assert_same_files(tmp_path / "again", tmp_path / "pulled")
    # and it is the library's svd blend of the two
    want = blend([read_adapter(dirs["c4"]), read_adapter(dirs["r8_qup"])], [0.7, 0.3], "svd", rank=4)
    assert_deltas(deltas(read_adapter(tmp_path / "again")), deltas(want), 0.0)

    r = registry_cli("show", "team/x", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.output)["manifest"]
    assert manifest["parents"] == [{"ref": ref, "digest": digest, "weight": w}
                                   for (ref, digest), w in zip(pushed.values(), [0.7, 0.3], strict=True)]
    assert manifest["recipe"] == recipe


def test_cli_blend_of_directories_needs_no_registry(registry_cli, dirs, tmp_path):
    a, b = shutil.copytree(dirs["c4"], tmp_path / "a"), shutil.copytree(dirs["d4"], tmp_path / "b")
    recipe_file = tmp_path / "r.json"
    r = registry_cli("blend", a, b, "--weights", "1,-0.5", "--method", "dare_linear", "--density", "0.5", "--seed", "3",
            "--rank", "4", "-o", tmp_path / "out", "--save-recipe", recipe_file)
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "reg").exists()
    recipe = json.loads(recipe_file.read_text())
    assert recipe["seed"] == 3 and [s["path"] for s in recipe["sources"]] == [str(a), str(b)]
    want = blend([read_adapter(a), read_adapter(b)], [1, -0.5], "dare_linear", rank=4, density=0.5, seed=3)
    assert_deltas(deltas(read_adapter(tmp_path / "out")), deltas(want), 0.0)
    r = registry_cli("blend", "--recipe", recipe_file, "-o", tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert_same_files(tmp_path / "out", tmp_path / "again")
    # a directory source that changed since the recipe was written is refused
    (b / "adapter_config.json").write_text((b / "adapter_config.json").read_text() + "\n")
    r = registry_cli("blend", "--recipe", recipe_file, "-o", tmp_path / "third")
    assert r.exit_code == 1 and "changed since the recipe was written" in r.output
    assert not (tmp_path / "third").exists()


def test_cli_blend_reports_incompatible_inputs(registry_cli, dirs, tmp_path):
    r = registry_cli("blend", dirs["c4"], dirs["ia3_a"], "-o", tmp_path / "out")
    assert r.exit_code == 1 and "error[kind-mismatch]" in r.output
    r = registry_cli("blend", dirs["c4"], dirs["d4"], "--method", "nope", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "'nope' is not one of 'linear', 'cat', 'svd'" in r.output  # a usage error
    assert not (tmp_path / "out").exists()


def test_a_weight_that_is_no_number_after_an_existing_source_says_so(tmp_path):
    """`run --sum DIR=abc` said "invalid name 'DIR=abc': at most one '/'" (the spec was taken as a reference)."""
    from adapterhub.errors import BlendError
    from adapterhub.sources import parse_weighted

    src = str(ADAPTERS_LIB / "llama_lora")
    with pytest.raises(BlendError, match=r"the weight 'abc' after '=' is not a number\.\n  fix: write SRC=WEIGHT"):
        parse_weighted(f"{src}=abc")
    assert parse_weighted(f"{src}=0.25") == (src, 0.25)
    assert parse_weighted("team/a=b") == ("team/a=b", 1.0)  # no such path: an '=' that is part of a name
    (tmp_path / "x=abc").mkdir()
    assert parse_weighted(str(tmp_path / "x=abc")) == (str(tmp_path / "x=abc"), 1.0)
