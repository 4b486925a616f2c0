"""Commands that need no math never import torch (issue 13): `--help`, `list`, `show`, `inspect`,
`check`, `push`, `pull` in the stored format, `tag`, `untag`, `rm`, `reindex`, `verify` and `gc`,
for every adapter kind: LoRA (PEFT
and the `adapters` library), IA3, bottleneck seq_bn and double_seq_bn, prefix tuning in the
`adapters` library's layouts and in PEFT's.

The commands run one after another in one fresh interpreter (torch is imported by this test
process, so it cannot be checked here); an import hook records where torch was first imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS_LIB

from adapterhub.adapter import Adapter, IA3Spec, Tensors
from adapterhub.formats import read_adapter, write_adapter
from adapterhub.registry import Registry

BASE = ADAPTERS_LIB / "tiny_llama_base"

RUN_COMMANDS = r"""
import json, sys, traceback
first = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "where" not in first:
            first["where"] = "".join(traceback.format_stack(limit=14)[:-1])
        return None

sys.meta_path.insert(0, Watch())
from adapterhub.cli import cli
done = []
for argv in json.loads(sys.argv[1]):
    try:
        cli.main(argv, prog_name="adapterhub")
        code = 0
    except SystemExit as e:
        code = e.code
    done.append({"argv": argv, "exit": code, "torch": "torch" in sys.modules})
    if "torch" in sys.modules:
        done[-1]["where"] = first["where"]
        break
print("\nRESULT " + json.dumps(done))
"""


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    """One adapter directory per kind, all fitting the tiny Llama base of the fixtures."""
    work = tmp_path_factory.mktemp("kinds")
    out = {"lora-adapters": ADAPTERS_LIB / "llama_lora", "seq_bn": ADAPTERS_LIB / "llama_seq_bn",
           "double_seq_bn": ADAPTERS_LIB / "llama_double_seq_bn",
           "prefix-adapters": ADAPTERS_LIB / "llama_prefix_tuning_safetensors",
           "prefix-flat": ADAPTERS_LIB / "llama_prefix_tuning_flat_safetensors"}
    out["lora-peft"] = write_adapter(read_adapter(ADAPTERS_LIB / "llama_lora"), work / "lora-peft", format="peft")
    g = torch.Generator().manual_seed(0)
    ia3 = Adapter(kind="ia3", spec=IA3Spec(target_modules=("k_proj", "down_proj"), feedforward_modules=("down_proj",)),
                  tensors=Tensors({f"model.layers.{i}.{m}.ia3_l": 1 + 0.1 * torch.randn(*shape, generator=g)
                                   for i in range(2) for m, shape in (("self_attn.k_proj", (32, 1)),
                                                                      ("mlp.down_proj", (1, 128)))}))
    out["ia3-peft"] = write_adapter(ia3, work / "ia3-peft", format="peft")
    from adapterhub.convert import convert_adapter

    out["prefix-peft"], _ = convert_adapter(ADAPTERS_LIB / "llama_prefix_tuning_safetensors", work / "prefix-peft",
                                            format="peft", base=BASE)
    return out


def run_commands(commands: list[list[str]], registry: Path) -> list[dict]:
    env = {"ADAPTERHUB_REGISTRY": str(registry), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)], capture_output=True, text=True,
                       env=env, timeout=120)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("kind", ["lora-peft", "lora-adapters", "ia3-peft", "seq_bn", "double_seq_bn",
                                  "prefix-peft", "prefix-adapters", "prefix-flat"])
def test_everyday_commands_never_import_torch(kind, kinds, tmp_path):
    registry = tmp_path / "reg"
    Registry(registry).push(kinds[kind], "team/stored")
    d = str(kinds[kind])
    commands = [["--help"], ["inspect", d], ["inspect", d, "--json"], ["check", d, "--base", str(BASE)],
                ["check", d, "--base", str(BASE), "--json"], ["push", d, "team/new"], ["push", d, "team/new"],
                ["list"], ["list", "team/*", "--kind", read_adapter(kinds[kind]).kind], ["show", "team/new"],
                ["show", "team/stored", "--json"], ["pull", "team/new", "-o", str(tmp_path / "copy")],
                ["pull", "team/stored", "-o", str(tmp_path / "link"), "--link"],
                ["pull", "team/new", "-o", str(tmp_path / "verified"), "--verify"], ["tag", "team/new@1", "prod"],
                ["untag", "team/new", "prod"], ["reindex"], ["verify"], ["rm", "team/stored@1"],
                ["gc", "--dry-run"], ["gc"], ["list", "--json"]]
    done = run_commands(commands, registry)
    assert [c["argv"] for c in done] == commands, f"torch was imported by {done[-1]['argv']}:\n{done[-1]['where']}"
    assert all(c["exit"] == 0 for c in done), [c for c in done if c["exit"] != 0]
    assert not any(c["torch"] for c in done)
    assert (tmp_path / "copy").is_dir() and (tmp_path / "verified").is_dir()


def test_the_check_itself_sees_torch(kinds, tmp_path):
    """The hook and the report work: a command that does math (a conversion) is seen importing torch."""
    done = run_commands([["list"], ["convert", str(kinds["lora-adapters"]), "-o", str(tmp_path / "c"),
                                    "--format", "peft"]], tmp_path / "reg")
    assert [c["torch"] for c in done] == [False, True] and "adapterhub" in done[-1]["where"]
