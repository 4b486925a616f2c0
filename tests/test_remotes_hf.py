"""The Hugging Face Hub as a remote, against tests/hubstandin.py: pushes through an ``HfApi`` stand-in that
enforces ``parent_commit`` (412) and tags (409) as the Hub does; pulls through huggingface_hub's real
``snapshot_download`` from a local HTTP server speaking the Hub's revision and resolve routes, which lays
out a real HF cache, then offline (``HF_HUB_OFFLINE``) from that cache alone."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner
from conftest import ADAPTERS_LIB
from hubstandin import HubServer, StandInApi
from peft import LoraConfig

from adapterhub.cli import cli
from adapterhub.errors import RemoteError, VersionConflictError
from adapterhub.registry import Registry
from adapterhub.registry.registry import canonical_json
from adapterhub.registry.remotes.hf import MANIFEST_FILE, local_name, pull_from_hub, push_to_hub

LLAMA_LORA = ADAPTERS_LIB / "llama_lora"
MINILM_LORA = ADAPTERS_LIB / "minilm_lora"
REPO = "team/sentiment-lora"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """(api stand-in, its HTTP server); huggingface_hub online, its cache in tmp_path."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    api = StandInApi()
    server = HubServer(api)
    api.create_repo(REPO)
    try:
        yield api, server
    finally:
        server.stop()


def files_at(api: StandInApi, rev: str) -> dict[str, bytes]:
    repo = api.repos[REPO]
    return repo.commits[repo.resolve(rev)][1]


def test_push_is_one_commit_with_peft_files_manifest_and_model_card_and_a_tag(hub, tmp_path):
    from huggingface_hub import ModelCard

    api, _ = hub
    reg = Registry(tmp_path / "reg")
    pushed = reg.push(LLAMA_LORA, "team/sent", description="sentiment, 3 epochs")
    result = push_to_hub(reg, "team/sent@1", f"hf://{REPO}", api=api)
    assert result.created and result.tag == "v1" and api.commit_calls == 1
    files = files_at(api, "v1")
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE]
    assert "sha256:" + hashlib.sha256(files[MANIFEST_FILE]).hexdigest() == pushed.digest
    assert files[MANIFEST_FILE] == canonical_json(reg.manifest("team/sent@1"))
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and "adapterhub" in card.data.tags
    assert card.data.base_model == reg.manifest("team/sent@1")["base"]["name_or_path"]
    assert pushed.digest in card.text and "sentiment, 3 epochs" in card.text
    pulled = tmp_path / "peft"
    reg.pull("team/sent@1", pulled, format="peft")
    assert files["adapter_model.safetensors"] == (pulled / "adapter_model.safetensors").read_bytes()
    again = push_to_hub(reg, "team/sent@1", f"hf://{REPO}", api=api)
    assert not again.created and api.commit_calls == 1, "a re-run commits nothing"


def test_a_push_whose_parent_moved_is_refused_with_412_and_retried_on_the_new_head(hub, tmp_path):
    api, _ = hub
    reg = Registry(tmp_path / "reg")
    reg.push(LLAMA_LORA, "team/sent")
    api.commit_files(REPO, {"LICENSE": b"apache-2.0\n"})
    api.before_commit = lambda a: a.commit_files(REPO, {"NOTES.md": b"someone else pushed\n"})
    result = push_to_hub(reg, "team/sent@1", f"hf://{REPO}", api=api)
    assert result.attempts == 2 and api.commit_calls == 4, "1 setup + 1 refused (412) + 1 hook + 1 retried"
    repo = api.repos[REPO]
    parent = repo.commits[result.commit][0]
    assert "NOTES.md" in repo.commits[parent][1], "the retry was built on the head that moved"
    files = files_at(api, "v1")
    assert {"LICENSE", "NOTES.md", "adapter_model.safetensors"} <= set(files), "nothing of the others' is lost"


def test_a_tag_holding_other_content_is_a_conflict(hub, tmp_path):
    api, _ = hub
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    a.push(LLAMA_LORA, "team/sent")
    b.push(MINILM_LORA, "team/sent")
    push_to_hub(a, "team/sent@1", f"hf://{REPO}", api=api)
    with pytest.raises(VersionConflictError) as e:
        push_to_hub(b, "team/sent@1", f"hf://{REPO}", api=api)
    assert e.value.ours == b.resolve("team/sent@1").digest and e.value.theirs == a.resolve("team/sent@1").digest


def test_pull_imports_any_peft_repo_then_reads_the_cache_offline(hub, tmp_path, llama_base, make_peft, monkeypatch):
    from huggingface_hub import constants

    api, server = hub
    peft_dir = make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=3)
    commit = api.commit_files(REPO, {p.name: p.read_bytes() for p in peft_dir.iterdir() if p.is_file()})
    api.create_tag(REPO, tag="v0.1", revision=commit)
    reg = Registry(tmp_path / "reg")
    got = pull_from_hub(reg, f"hf://{REPO}@v0.1", endpoint=server.url)
    assert got.commit == commit and got.created and got.ref == f"{local_name(REPO)}@1"
    m = reg.manifest(got.ref)
    assert m["origin"] == {"kind": "hf", "repo": REPO, "commit": commit, "revision": "v0.1"}
    out = tmp_path / "out"
    reg.pull(got.ref, out)
    assert (out / "adapter_model.safetensors").read_bytes() == (peft_dir / "adapter_model.safetensors").read_bytes()
    cache = tmp_path / "hf-cache" / f"models--{REPO.replace('/', '--')}"
    assert (cache / "refs" / "v0.1").read_text() == commit and (cache / "snapshots" / commit).is_dir()
    assert (cache / "snapshots" / commit / "adapter_model.safetensors").is_symlink(), "huggingface_hub's own layout"

    # offline: the cache alone answers; a second registry imports the same commit without the server
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(server.requests)
    other = Registry(tmp_path / "other")
    for rev in ("v0.1", commit):
        again = pull_from_hub(other, f"hf://{REPO}@{rev}", endpoint=server.url)
        assert again.commit == commit and other.manifest(again.ref)["files"] == m["files"]
    assert len(server.requests) == seen, "offline pulls never reached the server"
    assert not pull_from_hub(other, f"hf://{REPO}@{commit}").created, "imported once"
    with pytest.raises(RemoteError) as e:
        pull_from_hub(other, f"hf://{REPO}@main-never-downloaded")
    assert "not in the local Hugging Face cache" in str(e.value) and "fix:" in str(e.value)


def test_cli_push_to_hub_then_pull_round_trip(hub, tmp_path, monkeypatch):
    """The CLI with the stand-in's HTTP half for downloads; pushes reach the stand-in through HfApi()."""
    import adapterhub.registry.remotes.hf as hf

    api, server = hub
    monkeypatch.setattr(hf, "_api", lambda given, endpoint: api)
    reg = str(tmp_path / "reg")
    runner = CliRunner()
    assert runner.invoke(cli, ["--registry", reg, "push", str(LLAMA_LORA), "team/sent"]).exit_code == 0
    r = runner.invoke(cli, ["--registry", reg, "push", "team/sent@1", "--to", f"hf://{REPO}"])
    assert r.exit_code == 0 and f"team/sent@1 -> hf://{REPO} commit" in r.output and "tag v1" in r.output, r.output
    r = runner.invoke(cli, ["--registry", str(tmp_path / "r2"), "pull", f"hf://{REPO}@v1", "--name",
                            "imported/sent", "--endpoint-url", server.url, "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and "-> imported/sent@1" in r.output, r.output
    manifest = json.loads((tmp_path / "out").joinpath("adapter_config.json").read_text())
    assert manifest["peft_type"] == "LORA"


def test_a_missing_hub_repo_is_a_clear_error(hub, tmp_path):
    api, _ = hub
    reg = Registry(tmp_path / "reg")
    reg.push(LLAMA_LORA, "team/sent")
    with pytest.raises(RemoteError) as e:
        push_to_hub(reg, "team/sent@1", "hf://team/no-such-repo", api=api)
    assert "fix: create the repo first" in str(e.value)
    with pytest.raises(RemoteError) as e:
        push_to_hub(reg, "team/sent@1", "hf://not a repo", api=api)
