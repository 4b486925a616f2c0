"""NaN/Inf in adapter weights: found from the file bytes without torch, and refused with one error class
(NonFiniteError) wherever values are used: inspect and check report it, blend (every method), merge,
export and push refuse it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS_LIB
from peft import IA3Config, LoraConfig, PrefixTuningConfig
from safetensors.torch import save_file

from adapterhub import finite
from adapterhub.adapter import Tensors
from adapterhub.base import BaseCheckpoint
from adapterhub.cli import cli
from adapterhub.compose.blend import METHODS, blend, stack
from adapterhub.compose.checks import check_adapter
from adapterhub.compose.merge import merge_into
from adapterhub.errors import NonFiniteError
from adapterhub.formats import read_adapter
from adapterhub.tensorfile import read_header

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def special_values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Random values with NaN, +-Inf, the largest finite value, subnormals and zeros sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64) * 4
    info = torch.finfo(dtype)
    picks = torch.randint(0, n, (40,), generator=g)
    specials = [float("nan"), float("inf"), float("-inf"), info.max, -info.max, info.tiny / 4, 0.0, -0.0]
    if dtype == torch.float8_e4m3fn:  # no infinity: casting one gives NaN
        specials = [s for s in specials if abs(s) != float("inf")]
    for i, p in enumerate(picks):
        t[p] = specials[i % len(specials)]
    return t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["stdlib", "numpy"])
def test_scan_counts_exactly_what_torch_counts(dtype, backend, tmp_path, monkeypatch):
    monkeypatch.setattr(finite, "CHUNK_BYTES", 96)  # many pieces, boundaries inside the tensors
    tensors = {f"t{i}": special_values(dtype, n, seed=i) for i, n in enumerate((1, 7, 1000, 4099))}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    header = read_header(tmp_path / "w.safetensors")
    for name, t in tensors.items():
        want = int((~torch.isfinite(t if t.element_size() > 1 else t.float())).sum())
        assert finite.count_in_file(header.tensors[name], backend=backend) == want, name
        assert finite.count_in_tensor(t) == want


def test_scan_skips_integer_tensors(tmp_path):
    save_file({"i": torch.full((100,), -1, dtype=torch.int32)}, str(tmp_path / "w.safetensors"))
    assert finite.count_in_file(read_header(tmp_path / "w.safetensors").tensors["i"]) == 0


def poison(src: Path, dst: Path, tensor: str, values: dict[int, float]) -> Path:
    """A copy of an adapter directory with some values of one tensor replaced (e.g. by NaN)."""
    from safetensors import safe_open

    shutil.copytree(src, dst)
    weights = next(p for p in dst.iterdir() if p.suffix == ".safetensors")
    with safe_open(str(weights), "pt") as f:
        data, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = next(k for k in data if tensor in k)
    flat = data[key].reshape(-1).clone()
    for i, v in values.items():
        flat[i] = v
    data[key] = flat.reshape(data[key].shape)
    save_file(data, str(weights), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def pair(llama_base, make_peft):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return make_peft(llama_base, config, seed=41), make_peft(llama_base, config, seed=42)


@pytest.fixture(scope="module")
def nan_lora(pair, tmp_path_factory):
    return poison(pair[0], tmp_path_factory.mktemp("nan") / "a", "layers.1.self_attn.v_proj.lora_B",
                  {0: float("nan"), 5: float("inf"), 9: float("-inf")})


def test_inspect_and_check_report_it(nan_lora, llama_base):
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(nan_lora), "--json"]).output)
    assert info["non_finite"] == {"model.layers.1.self_attn.v_proj.lora_B": 3}
    text = CliRunner().invoke(cli, ["inspect", str(nan_lora)]).output
    assert "NaN/Inf     3 value(s) in 1 tensor(s): model.layers.1.self_attn.v_proj.lora_B (3 values)" in text
    report = check_adapter(read_adapter(nan_lora), BaseCheckpoint.open(llama_base))
    assert [(p.code, p.where, p.message) for p in report.errors] == [
        ("non-finite", "model.layers.1.self_attn.v_proj.lora_B", "holds 3 NaN/Inf value(s)")]
    result = CliRunner().invoke(cli, ["check", str(nan_lora), "--base", str(llama_base)])
    assert result.exit_code == 1 and "error[non-finite]" in result.output


NAN_MESSAGE = ("{label}: 3 NaN/Inf value(s) in 1 tensor(s): model.layers.1.self_attn.v_proj.lora_B (3 values).\n"
               "  fix: the adapter's weights are broken (training diverged or the file was damaged); re-export them "
               "from a good checkpoint. Nothing was written.")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_blend_method_refuses_it(method, nan_lora, pair):
    with pytest.raises(NonFiniteError) as info:
        blend([read_adapter(pair[1]), read_adapter(nan_lora)], [0.5, 0.5], method)
    assert str(info.value) == NAN_MESSAGE.format(label=nan_lora)
    with pytest.raises(NonFiniteError):
        stack([read_adapter(pair[1]), read_adapter(nan_lora)])


def test_ia3_prefix_and_bottleneck_blends_refuse_it(llama_base, make_peft, tmp_path):
    ia3 = make_peft(llama_base, IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    prefix = make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    for src, tensor in ((ia3, "k_proj"), (prefix, "prompt_embeddings"),
                        (ADAPTERS_LIB / "minilm_seq_bn", "adapter_up.weight")):
        bad = poison(src, tmp_path / f"bad-{Path(src).name}-{tensor}", tensor, {1: float("nan")})
        with pytest.raises(NonFiniteError, match=r"1 NaN/Inf value\(s\) in 1 tensor"):
            blend([read_adapter(src), read_adapter(bad)], [0.5, 0.5])


def test_a_blend_that_overflows_is_refused(pair):
    a = read_adapter(pair[0])
    huge = a.replace(tensors=Tensors({n: a.tensors[n] * 3e37 for n in a.tensors}))  # finite float32
    with pytest.raises(NonFiniteError, match=r"the linear blend's result: \d+ NaN/Inf value") as info:
        blend([huge, huge], [1000.0, 1000.0])
    assert "use smaller blend weights" in str(info.value)


def test_merge_and_export_refuse_it(nan_lora, llama_base, tmp_path):
    with pytest.raises(NonFiniteError) as info:
        merge_into(BaseCheckpoint.open(llama_base), [read_adapter(nan_lora)])
    assert str(info.value) == NAN_MESSAGE.format(label=nan_lora)
    result = CliRunner().invoke(cli, ["export", str(nan_lora), "--base", str(llama_base), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "3 NaN/Inf value(s)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_push_refuses_it_without_importing_torch(nan_lora, pair, tmp_path):
    script = (
        "import sys\n"
        "from adapterhub.registry import Registry\n"
        "from adapterhub.errors import NonFiniteError\n"
        f"reg = Registry({str(tmp_path / 'reg')!r})\n"
        f"print(reg.push({str(pair[1])!r}, 'good').version)\n"
        "try:\n"
        f"    reg.push({str(nan_lora)!r}, 'bad')\n"
        "except NonFiniteError as e:\n"
        "    print('REFUSED', e.counts)\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["1", "REFUSED {'model.layers.1.self_attn.v_proj.lora_B': 3}", "False False"]
    from adapterhub.registry import Registry

    assert [v.name for v in Registry(tmp_path / "reg").list()] == ["good"]


def test_config_values_of_every_format_are_checked(pair, tmp_path):
    """The `adapters` library's alpha and our own format's spec go through the same checks as PEFT's fields."""
    from adapterhub.errors import InvalidValueError
    from adapterhub.formats import write_adapter

    lib = tmp_path / "lib"
    shutil.copytree(ADAPTERS_LIB / "minilm_lora", lib)
    doc = json.loads((lib / "adapter_config.json").read_text())
    doc["config"]["alpha"] = float("nan")
    (lib / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(NonFiniteError, match=r"adapter_config.json: alpha is nan; it must be a finite number"):
        read_adapter(lib)
    native = write_adapter(read_adapter(pair[0]), tmp_path / "native", format="adapterhub")
    doc = json.loads((native / "adapterhub.json").read_text())
    doc["spec"]["r"] = True
    (native / "adapterhub.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidValueError, match=r"adapterhub.json: r must be an integer, not True \(bool\)"):
        read_adapter(native)
