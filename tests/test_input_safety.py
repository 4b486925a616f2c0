"""Hostile input files: JSON nested thousands deep, oversized configs and headers, FIFOs, links out of the folder.

Each must give one clear error (CorruptFileError / UnsafeLinkError, exit 2 at the CLI) and never a
RecursionError, a hang or a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ADAPTERS_LIB, raw_file

from adapterhub import _json
from adapterhub.cli import cli
from adapterhub.errors import CorruptFileError, UnsafeLinkError
from adapterhub.formats import read_adapter
from adapterhub.formats._files import MAX_JSON_BYTES, read_json
from adapterhub.tensorfile import read_header

MINILM_LORA = ADAPTERS_LIB / "minilm_lora"
LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"
# the probe from the issue: printf '{"peft_type": "LORA", "x": [[[[...3000 deep...]]]]}'
DEEP_CONFIG = '{"peft_type": "LORA", "x": ' + "[" * 3000 + "]" * 3000 + "}"


@pytest.fixture
def deep_adapter(tmp_path) -> Path:
    d = tmp_path / "deep"
    d.mkdir()
    (d / "adapter_config.json").write_text(DEEP_CONFIG)
    shutil.copyfile(ADAPTERS_LIB / "llama_lora" / "adapter.safetensors", d / "adapter_model.safetensors")
    return d


def test_depth_is_measured_outside_strings_and_bounded():
    assert not _json.depth_exceeds('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')
    assert not _json.depth_exceeds('{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')
    assert not _json.depth_exceeds("[" * 64 + "]" * 64)
    assert _json.depth_exceeds("[" * 65 + "]" * 65)
    assert _json.depth_exceeds('{"a":' * 65 + "1" + "}" * 65)
    assert _json.loads('{"a": [[1]]}') == {"a": [[1]]}
    for text in (DEEP_CONFIG, "[" * 100_000, '{"a":' * 5000):
        with pytest.raises(ValueError, match="nested deeper than 64 levels"):
            _json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        _json.loads("[" * 10)


def test_a_deeply_nested_config_is_a_clear_error(deep_adapter):
    with pytest.raises(CorruptFileError) as e:
        read_adapter(deep_adapter)
    assert str(e.value) == (f"{deep_adapter / 'adapter_config.json'} is nested deeper than 64 levels; no adapter or "
                            "model config is.\n  fix: restore the file from the adapter's source; it is damaged or "
                            "hostile.")


@pytest.mark.parametrize("command", ["inspect", "check", "convert", "push"])
def test_the_deep_config_probe_gives_exit_2_and_no_traceback_at_the_cli(command, deep_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "reg"))
    args = {"inspect": ["inspect", deep_adapter], "check": ["check", deep_adapter, "--base", LLAMA_BASE],
            "convert": ["convert", deep_adapter, "-o", tmp_path / "out"], "push": ["push", deep_adapter, "x"]}[command]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "nested deeper than 64 levels" in result.stderr
    assert "Traceback" not in result.output and not isinstance(result.exception, RecursionError)
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_safetensors_header_is_a_clear_error(tmp_path):
    header_bytes = b'{"__metadata__": {"x": "y"}, "a": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    path = raw_file(tmp_path / "deep.safetensors", None, header_bytes=header_bytes)
    with pytest.raises(CorruptFileError) as e:
        read_header(path)
    assert str(e.value).startswith(f"{path} has a header nested deeper than 64 levels; a safetensors header is 3 "
                                   "levels deep.\n  fix: ")


def test_an_oversized_config_is_refused_without_reading_it(tmp_path):
    d = tmp_path / "huge"
    shutil.copytree(MINILM_LORA, d)
    cfg = d / "adapter_config.json"
    with open(cfg, "r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no disk used
    with pytest.raises(CorruptFileError) as e:
        read_json(cfg)
    assert str(e.value).startswith(f"{cfg} is 67,108,865 bytes, more than the 64 MiB a JSON config may have.")


def test_a_fifo_config_is_refused_instead_of_blocking(tmp_path):
    d = tmp_path / "fifo"
    shutil.copytree(MINILM_LORA, d)
    (d / "adapter_config.json").unlink()
    os.mkfifo(d / "adapter_config.json")
    (d / "adapter.safetensors").unlink()
    os.mkfifo(d / "adapter.safetensors")
    outcome: list[BaseException] = []

    def run() -> None:
        for call in (lambda: read_json(d / "adapter_config.json"), lambda: read_header(d / "adapter.safetensors")):
            try:
                call()
            except CorruptFileError as e:
                outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert [str(e).splitlines()[0] for e in outcome] == [f"{d / 'adapter_config.json'} is not a regular file.",
                                                         f"{d / 'adapter.safetensors'} is not a regular file."]


def test_links_leaving_the_folder_are_refused_by_every_reader(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in MINILM_LORA.iterdir():
        shutil.copyfile(f, outside / f.name)
    for name in ("adapter_config.json", "adapter.safetensors"):
        d = tmp_path / f"link-{name}"
        shutil.copytree(MINILM_LORA, d)
        (d / name).unlink()
        (d / name).symlink_to(outside / name)
        with pytest.raises(UnsafeLinkError) as e:
            read_adapter(d)
        assert e.value.path == d / name and e.value.target == outside / name
        result = CliRunner().invoke(cli, ["inspect", str(d)])
        assert result.exit_code == 2 and f"{d / name} is a symbolic link to {outside / name}" in result.stderr
    linked_dir = tmp_path / "linked-dir"  # the folder itself may be a link: its files are inside it
    linked_dir.symlink_to(outside)
    assert read_adapter(linked_dir).kind == "lora"
    dangling = tmp_path / "dangling"
    shutil.copytree(MINILM_LORA, dangling)
    (dangling / "adapter.safetensors").unlink()
    (dangling / "adapter.safetensors").symlink_to("/nonexistent/adapter.safetensors")
    with pytest.raises(UnsafeLinkError):
        read_adapter(dangling)


# --- tensors whose shape cannot be what their role says (attack pass on issue 10) -----------------------------------

def _peft_copy(src: Path, dst: Path) -> Path:
    from adapterhub.formats import write_adapter

    return write_adapter(read_adapter(src), dst, format="peft")


LAYOUT_CASES = {  # case -> (how the adapter is made, tensor role it ends with, mutation, what the message says)
    "lora_A-0d": ("peft-lora", "lora_A.weight", lambda t: t.new_tensor(1.0), "lora_A must be a non-empty 2-d"),
    "lora_B-1d": ("peft-lora", "lora_B.weight", lambda t: t.flatten()[:3].clone(), "lora_B must be a non-empty 2-d"),
    "lora_B-other-rank": ("adapters-lora", "lora_B", lambda t: t.repeat(1, 2),
                          "its rank (dimension 1) must equal that of lora_A (8)"),
    "ia3-1d": ("peft-ia3", "ia3_l", lambda t: t.flatten().clone(), "ia3_l must be a non-empty 2-d"),
    "prefix-mlp-transposed": ("adapters-prefix", "control_trans.2.weight", lambda t: t.T.contiguous(),
                              "the prefix MLP layers do not chain"),
    "prefix-flat-short": ("adapters-prefix-flat", "control_trans", lambda t: t.flatten()[:3].clone(),
                          "it must hold prefix_length (10) x width values"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_tensors_of_impossible_shapes_are_refused_by_every_command(case, llama_base, make_peft, tmp_path,
                                                                 monkeypatch):
    """A 0-d lora_A, a 1-d lora_B, factors of two ranks, a prefix MLP whose layers do not chain: inspect, check,
    blend and export gave an internal error (IndexError/RuntimeError) instead of naming the tensor."""
    from peft import IA3Config
    from safetensors.torch import load_file, save_file

    how, role, mutate, message = LAYOUT_CASES[case]
    sources = {"peft-lora": lambda: _peft_copy(ADAPTERS_LIB / "llama_lora", tmp_path / "src"),
               "peft-ia3": lambda: make_peft(llama_base, IA3Config(target_modules=["k_proj", "down_proj"],
                                                                   feedforward_modules=["down_proj"])),
               "adapters-lora": lambda: ADAPTERS_LIB / "llama_lora",
               "adapters-prefix": lambda: ADAPTERS_LIB / "llama_prefix_tuning_safetensors",
               "adapters-prefix-flat": lambda: ADAPTERS_LIB / "llama_prefix_tuning_flat_safetensors"}
    adapter = shutil.copytree(sources[how](), tmp_path / "bad")
    [weights] = [p for p in adapter.glob("*.safetensors") if p.name in ("adapter.safetensors",
                                                                        "adapter_model.safetensors")]
    tensors = load_file(weights)
    name = sorted(n for n in tensors if n.endswith(role))[0]
    tensors[name] = mutate(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match=re.escape(message)):
        read_adapter(adapter)
    monkeypatch.chdir(tmp_path)
    for args in (["inspect", adapter], ["check", adapter, "--base", llama_base],
                 ["blend", adapter, adapter, "-o", tmp_path / "blend"],
                 ["export", adapter, "--base", llama_base, "-o", tmp_path / "export"]):
        result = CliRunner(env={"ADAPTERHUB_REGISTRY": str(tmp_path / "reg")}).invoke(cli, [str(a) for a in args])
        assert result.exit_code == 2 and "internal error" not in result.output, (args, result.output)
        assert message in result.output and "\n  fix: " in result.output, (args, result.output)
    assert not (tmp_path / "blend").exists() and not (tmp_path / "export").exists()
