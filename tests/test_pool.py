"""The adapter pool against PEFT: every row of a mixed batch equals that adapter run alone through PEFT, greedy
and beam generation equal PEFT's mixed-batch generate, rows without adapter equal the bare base bit for bit;
eviction, pinning, and refusals before any work.

One tiny GQA Llama (hidden 64, 2 layers) serves every test; PEFT runs on fresh copies of the same base.
"""

from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch
from conftest import load_base
from peft import IA3Config, LoraConfig, PeftModel

import adapterhub
from adapterhub.errors import AttachedStateError, PoolError
from adapterhub.formats import read_adapter
from adapterhub.registry import Registry
from adapterhub.runtime import Pool, Sum, attach
from adapterhub.runtime.slots import SlotSite, SlotState

FP32_TOL = 1e-5


def ids_for(rows: int, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def dirs(llama_base, make_peft):
    """PEFT adapters of mixed ranks, scales and targets (rsLoRA with rank/alpha patterns), IA3, one too big."""
    cfgs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                        rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 3}, alpha_pattern={"o_proj": 3}),
        "c": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "big": LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"]),
    }
    return {name: make_peft(llama_base, cfg, seed=40 + i) for i, (name, cfg) in enumerate(cfgs.items())}


@pytest.fixture(scope="module")
def ads(dirs):
    return {name: read_adapter(d) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def model(llama_base):
    return load_base(llama_base)


@pytest.fixture
def pool(model):
    with Pool(model, slots=4, max_rank=8) as p:
        yield p


def peft_alone(llama_base, adapter_dir, ids):
    m = PeftModel.from_pretrained(load_base(llama_base), adapter_dir).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def bare(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_row_of_a_mixed_batch_equals_that_adapter_alone_in_peft(pool, ads, dirs, model, llama_base):
    rows = ["a", None, "b", "c", "ia3", "a", None]
    ids = ids_for(len(rows))
    got = pool.forward([None if r is None else ads[r] for r in rows], input_ids=ids).logits
    base = bare(model, ids)
    for i, r in enumerate(rows):
        if r is None:
            assert torch.equal(bits(got[i]), bits(base[i])), f"row {i} is not the bare base bit for bit"
        else:
            want = peft_alone(llama_base, dirs[r], ids[i:i + 1])[0]
            assert (got[i] - want).abs().max() <= FP32_TOL, (i, r)
            assert (got[i] - base[i]).abs().max() > 1e-3, (i, r)  # the adapter really acts
    assert pool.stats()["used"] == 4 and pool.counters["loads"] == 4


def test_none_rows_are_the_bare_base_bit_for_bit_even_for_negative_zeros_and_infinities(pool, ads, model):
    """A row without adapter adds -0.0: a base output of -0.0 and inf activations stay as the base has them
    (adding +0.0, or a zero factor times inf, would not)."""
    x = model.get_input_embeddings().weight[ids_for(3)].detach().clone()
    x[1, 2] = float("inf")
    with torch.no_grad():
        want = model(inputs_embeds=x).logits
        got = pool.forward([ads["a"], None, ads["b"]], inputs_embeds=x).logits
    assert torch.equal(bits(got[1]), bits(want[1]))
    state = SlotState()
    site = SlotSite(torch.nn.Linear(4, 3), "lin", state, slots=1, max_rank=2)
    site.write_lora(1, torch.ones(2, 4), torch.ones(2, 3))
    site.fast, site.previous = False, lambda h: torch.full((2, 5, 3), -0.0)  # a base whose outputs are all -0.0
    state.set(torch.tensor([0, 1]), has_none=True)
    with torch.no_grad():
        y = site(torch.ones(2, 5, 4))
    assert torch.equal(bits(y[0]), bits(torch.full((5, 3), -0.0))) and torch.all(y[1] == 8)
    assert not torch.equal(bits(torch.full((1,), -0.0) + 0.0), bits(torch.full((1,), -0.0)))


def test_rows_run_the_same_whatever_slot_or_neighbours(pool, ads, model):
    ids = ids_for(3)
    first = pool.forward([ads["a"], ads["b"], ads["c"]], input_ids=ids).logits
    pool.evict(ads["a"])
    pool.load(ads["ia3"])
    again = pool.forward([ads["c"], ads["b"], ads["a"]], input_ids=ids[[2, 1, 0]]).logits
    assert (again[[2, 1, 0]] - first).abs().max() <= FP32_TOL


def test_weighted_sum_row_matches_peft_cat_and_is_refused_above_max_rank(ads, dirs, model, llama_base):
    ids = ids_for(3)
    row = Sum(ads["a"], ads["b"], weights=[0.7, -0.3])
    peft = PeftModel.from_pretrained(load_base(llama_base), dirs["a"], adapter_name="a")
    peft.load_adapter(dirs["b"], adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.7, -0.3], "mix", combination_type="cat")
    peft.set_adapter("mix")
    with torch.no_grad():
        want = peft.eval()(input_ids=ids[:1]).logits[0]
    with Pool(model, slots=2, max_rank=8) as small:
        with pytest.raises(PoolError, match=r"row 1 .* adds up to rank 12 .* above the pool's max_rank 8") as e:
            small.forward([None, row, ads["a"]], input_ids=ids)
        assert e.value.row == 1 and len(small) == 0 and small.counters["loads"] == 0
    with Pool(model, slots=2, max_rank=12) as big:
        got = big.forward([row, None, ads["a"]], input_ids=ids).logits
        assert (got[0] - want).abs().max() <= FP32_TOL
        # the same composition written again (new Sum object, same adapters and weights) shares the slot
        big.forward([Sum(ads["a"], ads["b"], weights=[0.7, -0.3])], input_ids=ids[:1])
        assert big.counters["loads"] == 2 and big.counters["hits"] >= 1


def test_greedy_and_beam_generate_equal_peft_mixed_batch_generate(dirs, ads, model, llama_base):
    peft = PeftModel.from_pretrained(load_base(llama_base), dirs["a"], adapter_name="a")
    for name in ("b", "c"):
        peft.load_adapter(dirs[name], adapter_name=name)
    peft.eval()
    names = ["a", "__base__", "b", "c", "b"]
    ids = ids_for(len(names), length=5, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    with Pool(model, slots=3, max_rank=8) as pool:
        rows = [None if n == "__base__" else ads[n] for n in names]
        for extra in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
            with torch.no_grad():
                want = peft.generate(**kw, **extra, adapter_names=names)
            got = pool.generate(rows, **kw, **extra)
            assert torch.equal(got, want), extra
        # sampling: each row keeps its adapter through num_return_sequences' row expansion
        torch.manual_seed(0)
        sampled = pool.generate(rows, **kw, do_sample=True, num_return_sequences=2, top_k=5)
        assert sampled.shape == (len(rows) * 2, ids.shape[1] + 6)
        with torch.no_grad():
            torch.manual_seed(0)
            peft_sampled = peft.generate(**kw, do_sample=True, num_return_sequences=2, top_k=5,
                                         adapter_names=[n for n in names for _ in range(2)])
        assert torch.equal(sampled, peft_sampled)


def test_eviction_under_pressure_keeps_pinned_adapters_and_outputs_exact(model, ads):
    ids = ids_for(2)
    with Pool(model, slots=2, max_rank=8) as pool:
        want = {n: pool.forward([None, ads[n]], input_ids=ids).logits[1] for n in ("b", "c", "ia3")}
        want["a"] = pool.forward([ads["a"], None], input_ids=ids).logits[0]
        pool.pin(ads["a"])
        for n in ["b", "c", "ia3", "b", "c", "ia3"] * 3:
            got = pool.forward([ads["a"], ads[n]], input_ids=ids).logits
            assert torch.equal(got[0], want["a"]) or (got[0] - want["a"]).abs().max() <= FP32_TOL
            assert (got[1] - want[n]).abs().max() <= FP32_TOL, n
        assert ads["a"] in pool and pool.counters["evictions"] >= 18
        before = dict(pool.counters)
        with pytest.raises(PoolError, match="needs 3 different adapters but the pool has 2 slots"):
            pool.forward([ads["a"], ads["b"], ads["c"]], input_ids=ids_for(3))
        pool.pin(ads["b"])
        with pytest.raises(PoolError, match=r"only 0 slot\(s\) can be freed \(2 pinned\)"):
            pool.forward([ads["c"], None], input_ids=ids)
        with pytest.raises(PoolError, match="is pinned"):
            pool.evict(ads["b"])
        assert pool.counters["loads"] == before["loads"] + 1  # only the pin of b loaded anything
        pool.unpin(ads["b"])
        pool.unpin(ads["a"])
        with pytest.raises(PoolError, match="is not pinned"):
            pool.unpin(ads["a"])
        pool.forward([ads["c"], ads["ia3"]], input_ids=ids)
        assert ads["a"] not in pool and ads["b"] not in pool


@pytest.fixture
def registry(tmp_path, dirs):
    reg = Registry(tmp_path / "reg")
    for name in ("a", "b", "big", "ia3"):
        reg.push(dirs[name], f"team/{name}")
    return reg


def test_registry_references_load_on_demand_and_share_slots(model, registry, dirs, ads, llama_base):
    ids = ids_for(4)
    with adapterhub.Pool(model, registry=registry.root, slots=3, max_rank=8) as pool:
        got = pool.forward(["team/a", "team/a@1", str(dirs["b"]), "team/ia3@latest"], input_ids=ids).logits
        assert pool.counters["loads"] == 3  # team/a and team/a@1 are one version, one slot
        with Pool(load_base(llama_base), slots=3, max_rank=8) as direct:
            want = direct.forward([ads["a"], ads["a"], ads["b"], ads["ia3"]], input_ids=ids).logits
        assert (got - want).abs().max() <= FP32_TOL


def test_bad_rows_are_refused_before_any_work_naming_the_row(model, registry, dirs, tmp_path, make_peft):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with adapterhub.Pool(model, registry=registry.root, slots=2, max_rank=8) as pool:
            pool.load("team/b")
            cases = [
                (["team/a", None, "team/nope"], r"row 2 \(team/nope\) cannot be served: no adapter named 'team/nope'"),
                (["team/a", "team/big"], r"row 1 \(team/big\): .* rank 16 at .*q_proj, above the pool's max_rank 8"),
                (["team/a", "team/a@7"], r"row 1 \(team/a@7\) cannot be served: 'team/a' has no version or tag '7'"),
                ([str(tmp_path / "missing")], r"row 0 .* does not exist"),
                ([42], r"row 0 \(42\) cannot be served: a composition leaf must be an Adapter"),
            ]
            for rows, message in cases:
                with pytest.raises(PoolError, match=message) as e:
                    pool.forward(rows, input_ids=ids_for(len(rows)))
                assert e.value.row == int(message.split("row ")[1][0])
                assert pool.counters["loads"] == 1 and "team/b" in pool and not calls
            with pytest.raises(PoolError, match="the batch has 3 row"):
                pool.forward(["team/a"], input_ids=ids_for(3))
    finally:
        handle.remove()


def test_incompatible_and_unservable_adapters_are_refused_with_the_report(model, tmp_path, make_peft, ads):
    from conftest import make_llama, save_model

    other = save_model(make_llama(0, hidden_size=32, intermediate_size=64), tmp_path / "narrow")
    narrow = read_adapter(make_peft(other, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), 5))
    bottleneck = read_adapter(os.path.join(os.path.dirname(__file__), "fixtures", "adapters_lib", "llama_seq_bn"))
    with Pool(model, slots=2, max_rank=8, targets=["q_proj", "v_proj"]) as pool:
        with pytest.raises(PoolError, match=r"(?s)row 1 .* cannot be served: .*shape") as e:
            pool.forward([None, narrow], input_ids=ids_for(2))
        assert e.value.reports and not e.value.reports[0].ok and len(pool) == 0
        with pytest.raises(PoolError, match="row 0 .* is a bottleneck adapter; a pool serves LoRA and IA3"):
            pool.forward([bottleneck], input_ids=ids_for(1))
        with pytest.raises(PoolError, match=r"row 0 .* changes model.layers.0.mlp.down_proj, which has no slots"):
            pool.forward([ads["a"]], input_ids=ids_for(1))
        assert len(pool) == 0 and pool.counters["loads"] == 0


def test_the_model_is_untouched_and_close_restores_it(model, ads):
    params = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    forwards = {n for n, m in model.named_modules() if "forward" in m.__dict__}
    keys = list(model.state_dict())
    with Pool(model, slots=2, max_rank=8) as pool:
        with pytest.raises(AttachedStateError, match="serves an adapter pool"):
            attach(model, ads["a"])
        with pytest.raises(AttachedStateError, match="already has a pool"):
            Pool(model)
        for n in ["a", "b", "c", "ia3"] * 5:
            pool.forward([ads[n], None], input_ids=ids_for(2))
        assert list(model.state_dict()) == keys
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == forwards
    for n, p in model.named_parameters():
        assert p.data_ptr() == params[n][0] and torch.equal(p, params[n][1]), n
    with pytest.raises(AttachedStateError, match="closed"):
        pool.forward([None], input_ids=ids_for(1))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_rss_stays_flat_over_load_evict_cycles(model, registry):
    """600 loads through the registry into 2 slots (bench/serve.py runs 10,000)."""
    with adapterhub.Pool(model, registry=registry.root, slots=2, max_rank=8) as pool:
        refs = ["team/a", "team/b", "team/ia3"]
        for i in range(60):
            pool.load(refs[i % 3])
        gc.collect()
        start = _rss()
        for i in range(600):
            pool.load(refs[i % 3])
        gc.collect()
        grown = _rss() - start
        assert pool.counters["evictions"] >= 600
    assert grown < 4 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 600 load/evict cycles"


def test_a_compiled_model_does_not_recompile_when_slots_change():
    """Loading, evicting and mixing adapters never changes a tensor shape: dynamo compiles once per batch shape
    (and once more for batches with / without a row of no adapter), never per adapter."""
    from conftest import make_llama
    from torch._dynamo.utils import counters

    from adapterhub.adapter import Adapter, LoraSpec, Tensors

    model = make_llama(0, num_hidden_layers=1)

    def lora(seed: int, r: int) -> Adapter:
        g = torch.Generator().manual_seed(seed)
        t = {}
        for m in ("q_proj", "v_proj"):
            lin = model.get_submodule(f"model.layers.0.self_attn.{m}")
            t[f"model.layers.0.self_attn.{m}.lora_A"] = torch.randn(r, lin.in_features, generator=g) * 0.1
            t[f"model.layers.0.self_attn.{m}.lora_B"] = torch.randn(lin.out_features, r, generator=g) * 0.1
        return Adapter("lora", LoraSpec(r=r, alpha=8, target_modules=("q_proj", "v_proj")), Tensors(t))

    loras = [lora(i, r=1 + i % 4) for i in range(6)]
    ids = ids_for(3)
    torch._dynamo.reset()
    counters.clear()
    with Pool(make_llama(0, num_hidden_layers=1), slots=2, max_rank=4) as eager, \
            Pool(model, slots=2, max_rank=4) as pool:
        pool.compile(backend="eager")
        pool.forward([loras[0], None, loras[1]], input_ids=ids)
        pool.forward([loras[0], loras[1], loras[0]], input_ids=ids)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(8):
                rows = [loras[(i + 2) % 6], None if i % 2 else loras[(i + 3) % 6], loras[(i + 2) % 6]]
                got = pool.forward(rows, input_ids=ids).logits
                assert (got - eager.forward(rows, input_ids=ids).logits).abs().max() <= FP32_TOL
        assert counters["stats"]["unique_graphs"] == graphs and pool.counters["evictions"] >= 8
    torch._dynamo.reset()


def test_readme_serving_example_runs(tmp_path, monkeypatch, capsys):
    """The README's pool example, on a copy of the demo registry (running it writes the registry's index)."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    code = readme.split("<!-- serving-example -->\n```python\n", 1)[1].split("```", 1)[0]
    shutil.copytree(root / "registry" / "demo", tmp_path / "demo-registry")
    code = code.replace('registry="registry/demo"', f'registry="{tmp_path / "demo-registry"}"')
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "<Pool 3/8 slots used" in out and "'pins': 1" in out
    logits, tokens = namespace["logits"], namespace["tokens"]
    assert logits.shape[0] == 4 and tokens.shape == (4, 8) and not namespace["pool"].open
    model = namespace["model"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=namespace["ids"]).logits[3], logits[3])


def test_the_demo_serves_a_mixed_batch(tmp_path, minilm_dir, capsys):
    import importlib.util
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "registry" / "demo", tmp_path / "reg")
    spec = importlib.util.spec_from_file_location("demo_serve", root / "scripts" / "demo_serve.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.main(str(tmp_path / "reg"), str(minilm_dir), ["demo/minilm-sentiment@1", "demo/minilm-sentiment@2"])
    out = capsys.readouterr().out
    assert "(bit-identical to the bare base: True)" in out
    assert "resident: one base 86.7 MiB + 2 adapter slots" in out and "2 x 86.7 MiB" in out


def test_non_finite_values_and_reentrant_batches_are_refused(model, ads, dirs):
    from adapterhub.adapter import Tensors

    b = ads["b"]
    poisoned = b.replace(tensors=Tensors({n: t * (float("inf") if n.endswith("lora_B") else 1.0)
                                          for n, t in b.tensors.items()}), source=None)
    # finite in the file, but infinite once the scale (16 / sqrt(8) for rsLoRA) is folded in
    huge = b.replace(tensors=Tensors({n: t.sign() * 3e38 if n.endswith("lora_B") else t
                                      for n, t in b.tensors.items()}), source=None)
    with Pool(model, slots=2, max_rank=8) as pool:
        with pytest.raises(PoolError, match=r"(?s)row 1 \(.*\) cannot be served: .*error\[non-finite\] "
                                            r"model.layers.0.mlp.down_proj.lora_B"):
            pool.forward([ads["a"], poisoned], input_ids=ids_for(2))
        with pytest.raises(PoolError, match=r"row 0 .* holds NaN or Inf values \(or overflows once scaled\)"):
            pool.forward([huge, ads["a"]], input_ids=ids_for(2))
        assert len(pool) == 0
        # an Adapter read again from the same directory is the same adapter: one slot
        pool.forward([ads["a"], read_adapter(dirs["a"])], input_ids=ids_for(2))
        assert pool.counters["loads"] == 1
        handle = model.model.layers[0].register_forward_pre_hook(lambda *_: pool.forward([None], input_ids=ids_for(1)))
        try:
            with pytest.raises(PoolError, match="running a batch already"):
                pool.forward([ads["a"]], input_ids=ids_for(1))
        finally:
            handle.remove()
        pool.forward([ads["a"]], input_ids=ids_for(1))  # the pool works again after the refused call


def test_an_adapter_replaced_in_memory_is_another_adapter(model, ads, dirs):
    """``replace()`` keeps ``source``: a changed copy must not be served from the original's slot."""
    from adapterhub.adapter import Tensors

    a = ads["a"]
    scaled = a.replace(tensors=Tensors({n: a.tensors[n] * 3 for n in a.tensors}))
    rescaled = a.replace(spec=dataclasses.replace(a.spec, alpha=a.spec.alpha * 2))
    ids = ids_for(3)
    with Pool(model, slots=4, max_rank=8) as pool:
        got = pool.forward([a, scaled, rescaled], input_ids=ids).logits
        assert pool.counters["loads"] == 3
        assert not torch.equal(got[0], got[1]) and not torch.equal(got[0], got[2])
        pool.forward([read_adapter(dirs["a"])], input_ids=ids_for(1))  # read again from disk: the same adapter
        assert pool.counters["loads"] == 3


def test_threads_share_a_pool_one_call_at_a_time(model, ads):
    import threading

    ids = ids_for(4, length=16)
    names = ["a", "b", "c", "ia3"]
    with Pool(model, slots=2, max_rank=8) as pool:  # 2 slots for 4 adapters: the threads evict each other's
        want = {n: pool.forward([ads[n]] * 4, input_ids=ids).logits for n in names}
        failures: list[str] = []

        def serve(n: str) -> None:
            for _ in range(6):
                try:
                    if not torch.equal(pool.forward([ads[n]] * 4, input_ids=ids).logits, want[n]):
                        failures.append(f"{n}: wrong logits")
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    failures.append(f"{n}: {e}")

        threads = [threading.Thread(target=serve, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []


def test_the_runtime_pool_points_registry_users_to_adapterhub_pool(model):
    with pytest.raises(PoolError, match=r"never a registry.\n  fix: adapterhub.Pool\(model, registry=") as e:
        Pool(model, registry="reg", slots=2)
    assert not isinstance(e.value, TypeError) and "_adapterhub_pool" not in model.__dict__
    with pytest.raises(TypeError, match="unexpected keyword argument.*: slot"):
        Pool(model, slot=2)


def test_slot_buffers_too_big_to_allocate_are_a_pool_error_and_change_nothing(model):
    """max_rank=10**9 raised torch's raw allocator RuntimeError."""
    with pytest.raises(PoolError, match=r"slots=8, max_rank=1000000000 need .* GiB on cpu, which could not be "
                                        r"allocated .*\n  fix: build the pool with fewer slots or a smaller max_rank"):
        Pool(model, slots=8, max_rank=10**9)
    assert "_adapterhub_pool" not in model.__dict__
    with Pool(model, slots=1, max_rank=1):  # nothing was left installed
        pass


def test_adapterhub_pool_on_a_mistyped_registry_path_refuses_and_creates_nothing(model, tmp_path):
    typo = tmp_path / "typo" / "sub"
    with adapterhub.Pool(model, registry=str(typo), slots=1, max_rank=4) as p:
        with pytest.raises(PoolError, match=f"row 0 \\(t/a\\) cannot be served: no adapterhub registry at {typo}"):
            p.forward(["t/a"], input_ids=ids_for(1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"targets": 123}, {"targets": None}, {"targets": ["q_proj", 5]},
                                    {"targets": b"q_proj"}, {"resolve": 5}])
def test_targets_and_resolvers_of_the_wrong_type_are_pool_errors(model, kwargs):
    """Were TypeErrors from deep inside (or, for resolve, at the first batch)."""
    with pytest.raises(PoolError, match=r"must be .*\n  fix: "):
        Pool(model, slots=1, max_rank=2, **kwargs)
    assert "_adapterhub_pool" not in model.__dict__


@pytest.mark.parametrize(("inputs", "says"), [
    ({"input_ids": torch.tensor([1, 2])}, r"input_ids has shape \[2\], not \[batch, length\]"),
    ({"input_ids": torch.ones(1, 1, 2, dtype=torch.long)}, r"input_ids has shape \[1, 1, 2\]"),
    ({"inputs_embeds": torch.zeros(2, 64)}, r"inputs_embeds has shape \[2, 64\], not \[batch, length, hidden\]"),
    ({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, "input_ids holds no rows"),
])
def test_inputs_that_are_not_a_batch_of_rows_are_refused_before_any_work(pool, inputs, says):
    """A 1-D input_ids was read as a batch of 2 (then the model's shape error); 3-D ran; 0 rows hit a reshape error."""
    rows = [None] * (2 if says.startswith(("input_ids has shape \\[2", "inputs_embeds")) else 1)
    with pytest.raises(PoolError, match=says):
        pool.forward(rows, **inputs)
    assert pool.counters["batches"] == 0 and len(pool) == 0
