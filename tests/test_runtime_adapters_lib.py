"""The runtime against the real `adapters` library: bottleneck Stack/Average, prefixes, LoRA, mixed compositions.

Single adapters are compared with the library's recorded outputs (tests/fixtures/adapters_lib/*.reference);
compositions with outputs the library computes in its own environment (.venv-adapters, through
tests/fixtures/adapters_lib_compose.py, one subprocess for every job). Second adapters of each kind are the
fixtures with fresh seeded values, written in the library's format by our writer (the library loads them
with no missing or unexpected key).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS_LIB, FIXTURES, load_base
from safetensors.torch import load_file

from adapterhub.adapter import Tensors
from adapterhub.formats import read_adapter, write_adapter
from adapterhub.runtime import Average, Stack, Sum, attach

ROOT = Path(__file__).resolve().parent.parent
ORACLE_PYTHON = ROOT / ".venv-adapters" / "bin" / "python"
LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"
OUT_KEY = {"minilm": "last_hidden_state", "llama": "logits"}

if not ORACLE_PYTHON.exists():
    if os.environ.get("ADAPTERHUB_REQUIRE_ADAPTERS_ORACLE"):
        raise RuntimeError(f"{ORACLE_PYTHON} is missing: run scripts/setup_adapters_env.sh")
    pytest.skip("the `adapters` library environment is not set up (scripts/setup_adapters_env.sh)",
                allow_module_level=True)

# name -> (fixture it is, or is derived from; seed of the fresh values or None for the fixture itself)
ADAPTERS = {
    "seq_bn": ("seq_bn", None), "seq_bn_b": ("seq_bn", 11), "double_seq_bn": ("double_seq_bn", None),
    "double_seq_bn_b": ("double_seq_bn", 12), "lora": ("lora", None), "lora_b": ("lora", 13),
    "prefix": ("prefix_tuning_safetensors", None), "prefix_b": ("prefix_tuning_flat_safetensors", 14),
}

# adapters the library makes in the oracle run: name -> (config class, its arguments, seed)
CREATED = {
    "par_bn": ("ParBnConfig", {"reduction_factor": 16}, 15),
    "seq_bn_ln": ("SeqBnConfig", {"reduction_factor": 16, "ln_before": True, "ln_after": True, "scaling": "learned",
                                  "residual_before_ln": False, "adapter_residual_before_ln": True,
                                  "non_linearity": "gelu"}, 16),
}

JOBS = {
    "par_bn": "par_bn",
    "seq_bn_ln": "seq_bn_ln",
    "stack_par_seq": ["Stack", "par_bn", "seq_bn"],
    "stack_seq_ln_double": ["Stack", "seq_bn_ln", "double_seq_bn"],
    "stack_seq_double": ["Stack", "seq_bn", "double_seq_bn"],
    "stack_double_seq": ["Stack", "double_seq_bn", "seq_bn"],
    "stack_seq_seq": ["Stack", "seq_bn", "seq_bn_b"],
    "average_weighted": ["Average", {"weights": [0.3, 0.7]}, "seq_bn", "seq_bn_b"],
    "average_1_0": ["Average", {"weights": [1, 0]}, "seq_bn", "seq_bn_b"],
    "average_default": ["Average", {}, "double_seq_bn", "double_seq_bn_b"],
    # (seq_bn has no attention-output adapter: the library's Average would fail there, so it averages double_seq_bn)
    "stack_of_average": ["Stack", ["Average", {"weights": [2, 1]}, "double_seq_bn", "double_seq_bn_b"], "seq_bn"],
    "prefix_stack": ["Stack", "prefix", "prefix_b"],
    "mixed": ["Stack", "prefix", "seq_bn", "double_seq_bn", "lora"],
    "lora_average": ["Average", {"weights": [0.25, 0.75]}, "lora", "lora_b"],
}
# a tiny RoBERTa (padding-aware positions, pad id 1): adapters the library makes for it, and jobs
ROBERTA_CREATED = {
    "seq_bn": ("SeqBnConfig", {"reduction_factor": 16}, 21, 0.02),
    "double_seq_bn": ("DoubleSeqBnConfig", {"reduction_factor": 16}, 22, 0.02),
    "prefix": ("PrefixTuningConfig", {"prefix_length": 5, "flat": True}, 23, 0.5),
    "lora": ("LoRAConfig", {"r": 4, "alpha": 8, "attn_matrices": ["q", "v"]}, 24, 0.02),
}
ROBERTA_JOBS = {"stack": ["Stack", "seq_bn", "double_seq_bn"], "prefix": "prefix",
                "mixed": ["Stack", "prefix", "double_seq_bn", "seq_bn", "lora"]}
# the library chains a Stack of LoRAs (its in/out sizes must agree: MiniLM's q and v are square)
LIBRARY_ONLY = {"lora_chain_minilm": ("minilm", ["Stack", "lora", "lora_b"])}


def base_dir(base: str, minilm: Path) -> Path:
    return minilm if base == "minilm" else LLAMA_BASE


@pytest.fixture(scope="module")
def models(minilm_dir):
    """One model per base and dtype for the whole module: every test detaches, leaving it bit for bit as loaded."""
    cache: dict[tuple[str, torch.dtype], torch.nn.Module] = {}

    def get(base: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if (base, dtype) not in cache:
            cache[(base, dtype)] = load_base(base_dir(base, minilm_dir)).to(dtype)
        return cache[(base, dtype)]

    return get


def reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(ADAPTERS_LIB / f"{name}.reference.safetensors")


def _variant(src: Path, seed: int, name: str, out: Path) -> Path:
    adapter = read_adapter(src)
    g = torch.Generator().manual_seed(seed)
    std = 0.5 if adapter.kind == "prefix" else 0.02
    fresh = {n: (torch.randn(adapter.tensors.shape(n), generator=g) * std).to(adapter.tensors[n].dtype)
             for n in sorted(adapter.tensors)}
    return write_adapter(adapter.replace(tensors=Tensors(fresh), name=name), out, format="adapters", name=name)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, minilm_dir):
    """Every adapter directory per base, and the library's output of every job."""
    tmp = tmp_path_factory.mktemp("adapters_lib_compose")
    dirs: dict[str, dict[str, Path]] = {}
    create = []
    for base in ("minilm", "llama"):
        dirs[base] = {}
        for name, (fixture, seed) in ADAPTERS.items():
            src = ADAPTERS_LIB / f"{base}_{fixture}"
            dirs[base][name] = src if seed is None else _variant(src, seed, name, tmp / f"{base}_{name}")
        for name, (cls, kwargs, seed) in CREATED.items():
            dirs[base][name] = tmp / f"{base}_{name}"
            create.append({"base": base, "name": name, "config": cls, "kwargs": kwargs, "seed": seed,
                           "out": str(dirs[base][name])})
    roberta = _tiny_roberta(tmp)
    dirs["roberta"] = {}
    for name, (cls, kwargs, seed, std) in ROBERTA_CREATED.items():
        dirs["roberta"][name] = tmp / f"roberta_{name}"
        create.append({"base": str(roberta), "name": name, "config": cls, "kwargs": kwargs, "seed": seed,
                       "std": std, "out": str(dirs["roberta"][name])})
    jobs = [{"id": f"roberta/{job}", "base": str(roberta), "setup": spec, "inputs": str(roberta / "inputs.safetensors"),
             "adapters": {n: str(dirs["roberta"][n]) for n in sorted(_names(spec))}}
            for job, spec in ROBERTA_JOBS.items()]
    specs = {(base, job): spec for base in ("minilm", "llama") for job, spec in JOBS.items()}
    specs.update({(base, job): spec for job, (base, spec) in LIBRARY_ONLY.items()})
    for (base, job), spec in specs.items():
        used = sorted(_names(spec))
        jobs.append({"id": f"{base}/{job}", "base": base, "setup": spec,
                     "adapters": {n: str(dirs[base][n]) for n in used},
                     "inputs": str(ADAPTERS_LIB / f"{base}_seq_bn.reference.safetensors")})
    (tmp / "jobs.json").write_text(json.dumps({"create": create, "jobs": jobs}))
    proc = subprocess.run([str(ORACLE_PYTHON), str(FIXTURES / "adapters_lib_compose.py"), str(tmp / "jobs.json"),
                           str(tmp / "out.safetensors")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return dirs, load_file(tmp / "out.safetensors")


def _tiny_roberta(tmp: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=100, max_position_embeddings=40, pad_token_id=1)
    path = tmp / "roberta"
    RobertaModel(config).eval().save_pretrained(path)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 1, 0  # right padding with the pad id
    save_file({"input_ids": ids, "attention_mask": mask}, path / "inputs.safetensors")
    return path


def _names(spec) -> set[str]:
    if isinstance(spec, str):
        return {spec}
    return set().union(*(_names(c) for c in spec[1:] if not isinstance(c, dict)))


def ours(spec, adapters):
    """Our tree for a job spec."""
    if isinstance(spec, str):
        return adapters[spec]
    kind, rest = spec[0], list(spec[1:])
    if kind == "Stack":
        return Stack(*[ours(c, adapters) for c in rest])
    opts = rest.pop(0)
    return Average(*[ours(c, adapters) for c in rest], **opts)


def run(model, tree, ref, base, **options) -> torch.Tensor:
    with attach(model, tree, **options), torch.no_grad():
        return getattr(model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]), OUT_KEY[base])


@pytest.mark.parametrize("base", ["minilm", "llama"])
@pytest.mark.parametrize("fixture", ["seq_bn", "double_seq_bn", "lora", "lora_all", "prefix_tuning_safetensors",
                                     "prefix_tuning_flat_safetensors"])
def test_single_adapter_matches_the_librarys_recorded_output(base, fixture, models):
    ref = reference(f"{base}_{fixture}")
    model = models(base)
    out = run(model, read_adapter(ADAPTERS_LIB / f"{base}_{fixture}"), ref, base)
    want = ref[OUT_KEY[base]]
    assert (out - want).abs().max() <= 1e-5
    assert (want - ref["base_output"]).abs().max() > 0.05


@pytest.mark.parametrize("base", ["minilm", "llama"])
@pytest.mark.parametrize("job", sorted(JOBS))
def test_composition_matches_the_library(base, job, lib, models):
    dirs, outputs = lib
    adapters = {n: read_adapter(p) for n, p in dirs[base].items()}
    ref = reference(f"{base}_seq_bn")
    model = models(base)
    out = run(model, ours(JOBS[job], adapters), ref, base)
    want = outputs[f"{base}/{job}"]
    assert (out - want).abs().max() <= 2e-5, (out - want).abs().max()
    assert (want - ref["base_output"]).abs().max() > 0.01


def test_average_1_0_is_not_the_first_adapter(lib):
    """The library normalises the weights, then takes the mean over children: [1, 0] halves the first output."""
    _, outputs = lib
    ref = reference("minilm_seq_bn")
    assert (outputs["minilm/average_1_0"] - ref["last_hidden_state"]).abs().max() > 0.05


def test_stack_order_matters_for_bottlenecks(lib):
    _, outputs = lib
    for base in ("minilm", "llama"):
        assert (outputs[f"{base}/stack_seq_double"] - outputs[f"{base}/stack_double_seq"]).abs().max() > 1e-3


def test_stacked_lora_sums_where_the_library_chains(lib, models):
    dirs, outputs = lib
    a, b = read_adapter(dirs["minilm"]["lora"]), read_adapter(dirs["minilm"]["lora_b"])
    ref = reference("minilm_seq_bn")
    model = models("minilm")
    stacked = run(model, Stack(a, b), ref, "minilm")
    summed = run(model, Sum(a, b), ref, "minilm")
    assert (stacked - summed).abs().max() <= 1e-6
    assert (stacked - outputs["minilm/lora_chain_minilm"]).abs().max() > 1e-3


@pytest.mark.parametrize("job", sorted(ROBERTA_JOBS))
def test_roberta_matches_the_library(job, lib):
    """RoBERTa numbers positions from padding_idx + 1 and skips padding: also behind an `adapters` prefix."""
    from transformers import RobertaModel

    dirs, outputs = lib
    base = dirs["roberta"]["seq_bn"].parent / "roberta"
    ref = load_file(base / "inputs.safetensors")
    adapters = {n: read_adapter(p) for n, p in dirs["roberta"].items()}
    model = RobertaModel.from_pretrained(base).eval()
    with torch.no_grad():
        plain = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    out = run(model, ours(ROBERTA_JOBS[job], adapters), ref, "minilm")
    want = outputs[f"roberta/{job}"]
    assert (out - want).abs().max() <= 2e-5, (out - want).abs().max()
    assert (want - plain).abs().max() > 0.01


@pytest.mark.parametrize("base", ["minilm", "llama"])
def test_bf16_mixed_composition_is_close_to_the_library(base, lib, models):
    dirs, outputs = lib
    adapters = {n: read_adapter(p) for n, p in dirs[base].items()}
    ref = reference(f"{base}_seq_bn")
    model = models(base, torch.bfloat16)
    out = run(model, ours(JOBS["mixed"], adapters), ref, base).float()
    want = outputs[f"{base}/mixed"]
    change = (want - ref["base_output"]).abs().max()
    # bf16 keeps ~3 significant digits through every layer: well under the adapters' own effect
    assert (out - want).abs().max() <= 0.05 * want.abs().max()
    assert (out - want).abs().max() < 0.2 * change
