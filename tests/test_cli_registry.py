"""Registry commands: push/pull/list/show/tag/untag/rm/gc/verify through the CLI, with --json and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ADAPTERS_LIB

from adapterhub.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "registry" / "demo"


def test_push_prints_ref_and_digest_last(registry_cli):
    result = registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/sent", "--tag", "prod", "--metric", "acc=0.9",
                 "--description", "first")
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    ref, digest = last.split()
    assert ref == "team/sent@1" and digest.startswith("sha256:") and len(digest) == 71
    again = registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/sent@1")
    assert again.exit_code == 0 and "identical content; nothing pushed" in again.output
    assert again.output.strip().splitlines()[-1] == last
    clash = registry_cli("push", ADAPTERS_LIB / "minilm_lora_all", "team/sent@1")
    assert clash.exit_code == 1 and "already exists with different content" in clash.output


def test_push_with_base_refuses_an_incompatible_adapter(registry_cli):
    result = registry_cli("push", ADAPTERS_LIB / "minilm_lora", "x", "--base", ADAPTERS_LIB / "tiny_llama_base")
    assert result.exit_code == 1
    assert "error[target-missing]" in result.output and "INCOMPATIBLE" in result.output
    assert registry_cli("list", "--json").output.strip() == "[]"


def test_bad_names_exit_2_before_touching_disk(registry_cli, tmp_path):
    for bad in ("../evil", "/abs", "Team/x", "a/b/c", "ａ"):
        result = registry_cli("push", ADAPTERS_LIB / "minilm_lora", bad)
        assert result.exit_code == 2 and "error: invalid name" in result.output, (bad, result.output)
    assert not (tmp_path / "reg").exists()


def test_list_show_tag_untag_rm_gc_verify(registry_cli):
    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/sent", "--tag", "prod")
    registry_cli("push", ADAPTERS_LIB / "minilm_lora_all", "team/sent")
    registry_cli("push", ADAPTERS_LIB / "llama_seq_bn", "team/bn")
    rows = json.loads(registry_cli("list", "--json").output)
    assert [(r["ref"], r["tags"]) for r in rows] == [("team/bn@1", ["latest"]), ("team/sent@1", ["prod"]),
                                                     ("team/sent@2", ["latest"])]
    assert [r["ref"] for r in json.loads(registry_cli("list", "team/s*", "--kind", "lora", "--json").output)] == [
        "team/sent@1", "team/sent@2"]
    assert [r["ref"] for r in json.loads(registry_cli("list", "--tag", "prod", "--json").output)] == ["team/sent@1"]
    assert "KIND" in registry_cli("list").output
    shown = json.loads(registry_cli("show", "team/sent@prod", "--json").output)
    assert shown["ref"] == "team/sent@1" and shown["manifest"]["kind"] == "lora"
    assert "adapter.safetensors" in registry_cli("show", "team/sent").output
    assert registry_cli("tag", "team/sent@1", "latest").exit_code == 0
    assert json.loads(registry_cli("show", "team/sent", "--json").output)["ref"] == "team/sent@1"
    assert registry_cli("untag", "team/sent", "latest").exit_code == 0
    assert json.loads(registry_cli("show", "team/sent", "--json").output)["ref"] == "team/sent@2"
    assert registry_cli("rm", "team/sent").exit_code == 2  # a version must be named
    assert registry_cli("rm", "team/sent@2").exit_code == 0
    dry = json.loads(registry_cli("gc", "--dry-run", "--json").output)
    assert dry["blobs"] and dry["expected_freed_size"] > 0
    assert "freed" in registry_cli("gc").output
    verified = registry_cli("verify", "--json")
    assert verified.exit_code == 0 and json.loads(verified.output)["ok"] is True
    assert registry_cli("show", "team/nope").exit_code == 1


def test_pull_and_verify_detect_a_corrupt_blob(registry_cli, tmp_path):
    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/sent")
    pulled = registry_cli("pull", "team/sent", "-o", tmp_path / "out", "--format", "peft")
    assert pulled.exit_code == 0, pulled.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert registry_cli("pull", "team/sent", "-o", tmp_path / "out").exit_code == 2  # not empty, no --force
    manifest = json.loads(registry_cli("show", "team/sent", "--json").output)["manifest"]
    weights = next(f for f in manifest["files"] if f["path"] == "adapter.safetensors")["sha256"]
    blob = tmp_path / "reg" / "blobs" / "sha256" / weights[:2] / weights[2:]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = registry_cli("pull", "team/sent", "-o", tmp_path / "again")
    assert bad.exit_code == 1 and "is corrupt (sha256 mismatch)" in bad.output and str(blob) in bad.output
    assert f"expected: sha256:{weights}" in bad.output
    assert not (tmp_path / "again").exists()
    report = registry_cli("verify")
    assert report.exit_code == 1 and "DAMAGED" in report.output and "adapter.safetensors" in report.output


def test_demo_registry_is_valid(tmp_path, monkeypatch):
    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy, ignore=shutil.ignore_patterns("index.sqlite*", "locks", "tmp", "snapshots"))
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(copy))
    result = CliRunner().invoke(cli, ["verify", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["versions"] >= 5 and not report["problems"]


def test_manifests_follow_the_published_schema(tmp_path):
    import jsonschema

    from adapterhub.registry import Registry

    schema = json.loads((ROOT / "registry" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    reg = Registry(tmp_path / "reg")
    reg.push(ADAPTERS_LIB / "minilm_lora", "team/sent", tags=["prod"], metrics={"acc": 0.9})
    reg.push(ADAPTERS_LIB / "llama_prefix_tuning_safetensors", "prefix", base=ADAPTERS_LIB / "tiny_llama_base")
    demo = Registry(shutil.copytree(DEMO, tmp_path / "demo", ignore=shutil.ignore_patterns(
        "index.sqlite*", "locks", "tmp", "snapshots")))
    manifests = [reg.manifest("team/sent"), reg.manifest("prefix")]
    manifests += [demo.manifest(v.ref) for v in demo.list()]
    for m in manifests:
        jsonschema.validate(m, schema)
    bad = dict(manifests[0], files=[{"path": "../x", "sha256": "0" * 64, "size": 1}])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
