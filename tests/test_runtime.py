"""The runtime's life cycle: attach leaves weights alone, detach restores bit for bit, swap and set_weights
change what runs without re-wrapping, bad input is refused before anything changes.

Outputs against the oracles are in test_runtime_peft.py and test_runtime_adapters_lib.py.
"""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS_LIB, input_ids, load_base, make_llama, save_model
from peft import IA3Config, LoraConfig, PrefixTuningConfig

import adapterhub
from adapterhub.adapter import Tensors
from adapterhub.cli import cli
from adapterhub.errors import AttachedStateError, AttachError, CompositionError
from adapterhub.formats import read_adapter, write_adapter
from adapterhub.runtime import Average, Stack, Sum, attach, attached_to

LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"


def in_memory(adapter):
    """The adapter with its tensors loaded (no file reads per attach)."""
    return adapter.replace(tensors=Tensors(adapter.tensors.materialize()))


@pytest.fixture(scope="module")
def ads(make_peft):
    """Adapters of every kind for the adapters library's tiny Llama (hidden 64, GQA)."""
    mk = {
        "lora_a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "lora_b": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
        "lora_c": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
        "lora_k": LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "prefix": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }
    out = {name: in_memory(read_adapter(make_peft(LLAMA_BASE, cfg, seed=20 + i)))
           for i, (name, cfg) in enumerate(mk.items())}
    for name in ("seq_bn", "double_seq_bn"):
        out[name] = in_memory(read_adapter(ADAPTERS_LIB / f"llama_{name}"))
    return out


@pytest.fixture(scope="module")
def model():
    return load_base(LLAMA_BASE)


def snapshot(model):
    return {"params": {n: (id(p), p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()},
            "keys": list(model.state_dict()),
            "forwards": {n for n, m in model.named_modules() if "forward" in m.__dict__},
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            "attributes": sorted(model.__dict__)}


def assert_unchanged(model, snap) -> None:
    now = snapshot(model)
    assert now["keys"] == snap["keys"]
    assert now["forwards"] == snap["forwards"] and now["hooks"] == snap["hooks"]
    assert now["attributes"] == snap["attributes"]
    for n, (ident, ptr, value) in snap["params"].items():
        i2, p2, v2 = now["params"][n]
        assert (i2, p2) == (ident, ptr), n
        assert torch.equal(v2, value) and v2.dtype == value.dtype, n


def logits(model, ids=None):
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def mixed(ads, w=(0.7, -0.3)):
    return Stack(ads["prefix"], Stack(ads["seq_bn"], ads["double_seq_bn"]),
                 Sum(ads["lora_a"], ads["lora_b"], weights=list(w)), ads["ia3"])


# --- attach / detach ------------------------------------------------------------------------------


def test_attached_model_keeps_weights_keys_and_identities_and_detach_restores_it(ads, model):
    snap, before = snapshot(model), logits(model)
    with attach(model, mixed(ads)) as attached:
        during = snapshot(model)
        assert during["keys"] == snap["keys"]
        for n, (ident, ptr, value) in snap["params"].items():
            assert during["params"][n][:2] == (ident, ptr) and torch.equal(during["params"][n][2], value)
        assert during["forwards"] and during["hooks"]  # what it installed: instance forwards and hooks only
        assert attached_to(model) is attached
        assert (logits(model) - before).abs().max() > 0.05
    assert attached_to(model) is None and not attached.attached
    assert_unchanged(model, snap)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_1000_cycles_leave_every_weight_bit_identical_and_memory_flat(ads, dtype):
    model = load_base(LLAMA_BASE).to(dtype)
    snap, before = snapshot(model), logits(model)
    first = mixed(ads)
    handles = []

    def cycle(i: int) -> None:
        with attach(model, first) as attached:
            attached.set_weights([0.5, 0.5 + i % 3], block=first.children[2])
            attached.swap(ads["lora_b"], ads["lora_c"])
            attached.set_weights([1.0, -1.0], block=[2])
        handles.append(weakref.ref(attached))

    for i in range(50):  # warm up allocator and caches
        cycle(i)
    gc.collect()
    rss0 = rss_bytes()
    for i in range(950):
        cycle(i)
    gc.collect()
    growth = rss_bytes() - rss0
    assert growth < 8 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 950 cycles"
    assert sum(h() is not None for h in handles) == 0  # every Attached was freed
    assert_unchanged(model, snap)
    assert torch.equal(logits(model), before)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_model_dropped_while_attached_is_freed(ads):
    m = load_base(LLAMA_BASE)
    attach(m, mixed(ads))
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_context_manager_detaches_on_error(ads, model):
    snap = snapshot(model)
    with pytest.raises(ZeroDivisionError), attach(model, ads["lora_a"]):
        1 / 0  # noqa: B018
    assert_unchanged(model, snap)


def test_one_composition_per_model(ads, model):
    with attach(model, ads["lora_a"]) as first:
        with pytest.raises(AttachedStateError, match="already has a composition attached"):
            attach(model, ads["lora_b"])
    first.detach()  # idempotent
    with pytest.raises(AttachedStateError, match="detached"):
        first.set_weights([1.0])


# --- swap / set_weights --------------------------------------------------------------------------


def test_swap_and_set_weights_equal_a_fresh_attach(ads, model):
    a, b, c = ads["lora_a"], ads["lora_b"], ads["lora_c"]
    s = Sum(a, b, weights=[0.7, 0.3])
    with attach(model, s) as attached:
        sites = {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__}
        attached.swap(b, c)
        swapped = logits(model)
        attached.set_weights([0.2, 1.5], block=s)
        reweighted = logits(model)
        # no module was re-wrapped: the same site objects are installed
        assert sites == {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__}
    with attach(model, Sum(a, c, weights=[0.7, 0.3])):
        assert torch.equal(logits(model), swapped)
    with attach(model, Sum(a, c, weights=[0.2, 1.5])):
        assert torch.equal(logits(model), reweighted)


def test_average_weights_via_set_weights(ads, model):
    seq = ads["seq_bn"]
    other = seq.replace(tensors=Tensors({n: t * 1.5 for n, t in seq.tensors.items()}))
    avg = Average(seq, other, weights=[1, 1])
    with attach(model, Stack(avg, ads["lora_a"])) as attached:
        attached.set_weights([3, 1], block=avg)
        got = logits(model)
    with attach(model, Stack(Average(seq, other, weights=[0.75, 0.25]), ads["lora_a"])):
        assert (logits(model) - got).abs().max() <= 1e-6


def test_refused_changes_change_nothing(ads, model):
    a, b = ads["lora_a"], ads["lora_b"]
    with attach(model, Sum(a, b)) as attached:
        before = logits(model)
        with pytest.raises(AttachError, match="needs modules the attached one does not touch"):
            attached.swap(b, ads["lora_k"])  # k_proj has no site
        with pytest.raises(CompositionError, match="finite"):
            attached.set_weights([1.0, float("nan")])
        with pytest.raises(CompositionError, match="2 children but 3 weights"):
            attached.set_weights([1, 2, 3])
        with pytest.raises(CompositionError, match="cannot swap a lora adapter for a ia3"):
            attached.swap(b, ads["ia3"])
        with pytest.raises(CompositionError, match="not part of the attached composition"):
            attached.swap(ads["lora_c"], b)
        assert torch.equal(logits(model), before)
        assert attached.composition.children[1] is b


def test_swapped_prefix_refuses_a_cache_made_with_the_old_one(ads, model):
    p = ads["prefix"]
    q = p.replace(tensors=Tensors({"prompt_embeddings": p.tensors["prompt_embeddings"] * 2}))
    ids = input_ids()
    with attach(model, p) as attached, torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        attached.swap(p, q)
        with pytest.raises(AttachedStateError, match="another prefix"):
            model(input_ids=ids[:, :1], past_key_values=cache)
        from transformers import DynamicCache

        foreign = DynamicCache()
        for layer in range(2):
            foreign.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), layer)
        with pytest.raises(AttachedStateError, match="does not start with the attached prefix"):
            model(input_ids=ids[:, :1], past_key_values=foreign)


# --- refused before anything changes -----------------------------------------------------------------


def test_a_failed_attach_leaves_the_model_as_it_was_with_the_check_report(ads, model, make_peft, tmp_path):
    wide = save_model(make_llama(0, hidden_size=32, intermediate_size=64), tmp_path / "wide")
    bad_dir = make_peft(wide, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=3)
    snap = snapshot(model)
    with pytest.raises(AttachError) as info:
        attach(model, Stack(ads["seq_bn"], Sum(ads["lora_a"], read_adapter(bad_dir))))
    assert_unchanged(model, snap)
    assert attached_to(model) is None
    # the same lines `adapterhub check` prints for the checkpoint the model was loaded from
    cli = CliRunner().invoke(cli_main(), ["check", str(bad_dir), "--base", str(LLAMA_BASE)])
    assert cli.exit_code == 1
    lines = [line for line in cli.output.splitlines() if line.strip()]
    assert lines and all(line in str(info.value) for line in lines), (cli.output, str(info.value))
    assert {p.code for p in info.value.report.errors} == {"shape"} and len(info.value.report.errors) == 8
    assert "the model was not changed" in str(info.value)


def cli_main():
    return cli


def test_non_finite_adapter_values_are_refused(ads, model):
    a = ads["lora_a"]
    name = sorted(a.tensors)[0]
    poisoned = a.replace(tensors=Tensors({**a.tensors.materialize(), name: torch.full_like(a.tensors[name], math.nan)}))
    snap = snapshot(model)
    with pytest.raises(AttachError, match=r"error\[non-finite\].*NaN"):  # check_adapter reports it first
        attach(model, Sum(ads["lora_b"], poisoned))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("build, message", [
    (lambda d: Stack(), "has no children"),
    (lambda d: Sum(d["lora_a"], d["lora_b"], weights=[1]), "2 children but 1 weights"),
    (lambda d: Sum(d["lora_a"], weights=[math.inf]), "finite"),
    (lambda d: Sum(d["seq_bn"], d["lora_a"]), "bottleneck adapter inside a Sum"),
    (lambda d: Stack(Sum(d["prefix"])), "prefix adapter inside a Sum"),
    (lambda d: Average(d["ia3"], d["ia3"]), "ia3 adapter inside an Average"),
    (lambda d: Average(d["seq_bn"], d["lora_a"]), "mixes bottleneck, lora"),
    (lambda d: Average(d["seq_bn"], d["seq_bn"], weights=[1, -1]), "sum to 0"),
    (lambda d: Sum(d["ia3"], weights=[0.5]), "no real power 0.5"),
    (lambda d: Stack(str(ADAPTERS_LIB / "llama_lora")), "takes Adapter values"),
    (lambda d: Average(d["double_seq_bn"], d["seq_bn"]), "Average child has no adapter here"),
])
def test_malformed_compositions_are_refused_before_anything_changes(build, message, ads, model):
    d = dict(ads)
    ia3 = d["ia3"]
    d["ia3"] = ia3.replace(tensors=Tensors({n: t - 1.0 for n, t in ia3.tensors.items()}))  # entries <= 0
    snap = snapshot(model)
    with pytest.raises(CompositionError, match=message):
        attach(model, build(d))
    assert_unchanged(model, snap)


def test_what_the_runtime_cannot_run_is_reported_like_a_check(make_peft, model, ads):
    dora = read_adapter(make_peft(LLAMA_BASE, LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]), seed=4))
    carried = read_adapter(make_peft(LLAMA_BASE, LoraConfig(r=2, target_modules=["q_proj"],
                                                            modules_to_save=["lm_head"]), seed=5))
    embed = read_adapter(make_peft(LLAMA_BASE, LoraConfig(r=2, target_modules=["embed_tokens"]), seed=6))
    snap = snapshot(model)
    for adapter, code in ((dora, "runtime-dora"), (carried, "runtime-carried"), (embed, "runtime-module")):
        with pytest.raises(AttachError) as info:
            attach(model, adapter)
        assert code in {p.code for p in info.value.report.errors}
    assert_unchanged(model, snap)
    gpt2 = gpt2_model()
    with pytest.raises(AttachError) as info:
        attach(gpt2, ads["seq_bn"])
    assert "runtime-arch" in {p.code for p in info.value.report.errors}


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def test_lora_and_ia3_on_gpt2_conv1d_match_peft(make_peft, tmp_path):
    """No table row needed: transposed Conv1D modules are Linear-like."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = save_model(gpt2_model(), tmp_path / "gpt2")
    ids = input_ids()
    model = GPT2LMHeadModel.from_pretrained(base).eval()
    for cfg in (LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True)):
        src = make_peft(None, cfg, seed=7, model=GPT2LMHeadModel.from_pretrained(base))
        with torch.no_grad():
            want = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), src).eval()(input_ids=ids).logits
        with attach(model, read_adapter(src)), torch.no_grad():
            got = model(input_ids=ids).logits
        assert (got - want).abs().max() <= 2e-5


def test_someone_elses_wrapper_blocks_detach_until_removed(ads, model):
    snap = snapshot(model)
    attached = attach(model, ads["lora_b"])
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    ours = q.__dict__["forward"]
    q.forward = lambda x: ours(x)
    with pytest.raises(AttachedStateError, match="replaced by someone else"):
        attached.detach()
    assert attached.attached and "forward" in model.get_submodule("model.layers.0.self_attn.o_proj").__dict__
    q.forward = ours
    attached.detach()
    assert_unchanged(model, snap)


def test_a_prefix_refuses_4d_masks(ads, model):
    ids = input_ids()
    with attach(model, ads["prefix"]), pytest.raises(AttachedStateError, match="not 2-d"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 7, 7))


# --- the layer above: references and directories ----------------------------------------------------


def test_top_level_attach_reads_directories_and_registry_references(ads, model, tmp_path):
    reg = tmp_path / "reg"
    lora_dir = write_adapter(ads["lora_a"], tmp_path / "a", format="peft")
    from adapterhub.registry import Registry

    Registry(reg).push(write_adapter(ads["lora_b"], tmp_path / "b", format="peft"), "team/b", tags=["prod"])
    with adapterhub.attach(model, adapterhub.Sum(str(lora_dir), "team/b@prod", weights=[0.7, 0.3]),
                           registry=reg) as attached:
        got = logits(model)
        attached.swap("team/b@prod", str(lora_dir))
        doubled = logits(model)
    with attach(model, Sum(ads["lora_a"], ads["lora_b"], weights=[0.7, 0.3])):
        assert torch.equal(logits(model), got)
    with attach(model, Sum(ads["lora_a"], ads["lora_a"], weights=[0.7, 0.3])):
        assert torch.equal(logits(model), doubled)


def test_importing_adapterhub_and_the_blocks_does_not_import_torch():
    code = ("import sys, adapterhub; from adapterhub import attach, Sum, Stack, Average; "
            "Stack(Sum('a', 'b', weights=[1, 2]), Average('c', 'd')); assert 'torch' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# --- the command line ------------------------------------------------------------------------------


def test_cli_run_shows_a_prompt_without_and_with_the_composition(minilm_dir, model, ads):
    runner = CliRunner()
    lib = ADAPTERS_LIB
    out = runner.invoke(cli, ["run", "--base", str(LLAMA_BASE), str(lib / "llama_seq_bn"), str(lib / "llama_lora"),
                              "--ids", "5,6,7", "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    assert "2 bottleneck site(s), 4 linear site(s)" in out.output
    base_line = next(line for line in out.output.splitlines() if line.startswith("base "))
    with attach(model, Stack(read_adapter(lib / "llama_seq_bn"), read_adapter(lib / "llama_lora"))):
        want = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    assert f"attached  {want}" in out.output and base_line.startswith("base      [")
    enc = runner.invoke(cli, ["run", "--base", str(minilm_dir), "--prompt", "hello world", str(lib / "minilm_seq_bn")])
    assert enc.exit_code == 0, enc.output
    assert "mean-pooled output: cosine similarity 0.9" in enc.output
    bad = runner.invoke(cli, ["run", "--base", str(LLAMA_BASE), "--sum", str(lib / "llama_seq_bn=0.5"), "--ids", "1"])
    assert bad.exit_code == 1 and "bottleneck adapter inside a Sum" in bad.output
    wrong = runner.invoke(cli, ["run", "--base", str(LLAMA_BASE), str(lib / "minilm_lora"), "--ids", "1"])
    assert wrong.exit_code == 1 and "error[target-missing] encoder.layer.0.attention.self.query" in wrong.output
    assert "Traceback" not in bad.output + wrong.output


def test_readme_runtime_example_runs(monkeypatch, capsys):
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    code = readme.split("<!-- runtime-example -->\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "attached: Stack(" in out and "a prefix of 10 tokens" in out
    assert not namespace["attached"].attached


def test_a_refused_swap_to_non_finite_values_is_refused_again(ads, model):
    b = ads["lora_b"]
    poisoned = b.replace(tensors=Tensors({n: t * math.inf for n, t in b.tensors.items()}))
    with attach(model, Sum(ads["lora_a"], b)) as attached:
        before = logits(model)
        for _ in range(2):
            with pytest.raises(AttachError, match="non-finite"):
                attached.swap(b, poisoned)
            assert torch.equal(logits(model), before)


@pytest.mark.parametrize(("args", "message"), [
    (["--ids", "-1,2"], "token id(s) -1 are outside the vocabulary of"),
    (["--ids", "5,99999999"], "token id(s) 99999999 are outside the vocabulary of"),
    (["--ids", ","], "no token ids were given"),
    (["--ids", "5", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer, not 0"),
])
def test_cli_run_refuses_ids_and_lengths_the_model_cannot_take(args, message):
    """Were internal errors (IndexError from the embedding, transformers' ValueError, a reshape error)."""
    out = CliRunner().invoke(cli, ["run", "--base", str(LLAMA_BASE), str(ADAPTERS_LIB / "llama_lora"), *args])
    assert out.exit_code == 1, out.output  # as the other CompositionErrors of run (neither prompt nor ids)
    assert message in out.output and "\n  fix: pass " in out.output and "internal error" not in out.output


@pytest.mark.parametrize("merge", [False, True])
def test_a_composition_that_overflows_once_weights_are_folded_in_is_refused(model, ads, merge):
    """Sum(a=1e308, b=1e308) of finite adapters attached and generated from NaN logits (`run` printed [0, 0, 0])."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = input_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    tree = Sum(ads["lora_a"], ads["lora_b"], weights=[1e308, 1e308])
    with pytest.raises(CompositionError, match=r"the composition overflows at model\.layers\.\d\.\S+: .* NaN or Inf "
                                               r"in float32\.\n  fix: use smaller composition weights"):
        attach(model, tree, merge=merge)
    assert attached_to(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


@pytest.mark.parametrize("change", [{"hidden_size": "64"}, {"intermediate_size": 100}])
def test_cli_run_on_a_base_whose_config_disagrees_with_its_weights_is_one_clear_error(tmp_path, change):
    """Were internal errors (transformers' config validation error, its size-mismatch RuntimeError)."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(LLAMA_BASE, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **change}))
    out = CliRunner().invoke(cli, ["run", "--base", str(base), str(ADAPTERS_LIB / "llama_lora"), "--ids", "1"])
    assert out.exit_code == 2 and f"error: transformers cannot load {base} (" in out.output, out.output
    assert "\n  fix: pass a transformers model directory whose config.json matches its weights" in out.output
    assert "internal error" not in out.output
