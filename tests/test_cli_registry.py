"""Registry commands: push/pull/list/show/tag/untag/rm/gc/verify through the CLI, with --json and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
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


def test_pull_verify_rehashes_a_blob_whose_stamp_is_trusted(registry_cli, tmp_path):
    from adapterhub.registry import Registry

    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/sent")
    reg = Registry(tmp_path / "reg")
    weights = next(f for f in reg.manifest("team/sent")["files"] if f["path"] == "adapter.safetensors")["sha256"]
    blob = reg.store.blob_path("sha256:" + weights)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    reg.index.stamp("sha256:" + weights, reg._stat_stamp("sha256:" + weights))  # damage stat cannot see
    reg.close()
    assert registry_cli("pull", "team/sent", "-o", tmp_path / "trusted").exit_code == 0
    bad = registry_cli("pull", "team/sent", "-o", tmp_path / "checked", "--verify")
    assert bad.exit_code == 1 and "is corrupt (sha256 mismatch)" in bad.output and str(blob) in bad.output
    assert not (tmp_path / "checked").exists()


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


def _blob(tmp_path: Path, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return tmp_path / "reg" / "blobs" / "sha256" / hexd[:2] / hexd[2:]


def test_a_damaged_version_is_reported_and_removed_with_the_printed_fix(registry_cli, tmp_path):
    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/good")
    bad = registry_cli("push", ADAPTERS_LIB / "llama_lora", "team/bad").output.split()[-1]
    _blob(tmp_path, bad).unlink()
    for f in (tmp_path / "reg").glob("index.sqlite*"):
        f.unlink()
    listed = registry_cli("list")
    assert listed.exit_code == 0 and "team/good@1" in listed.stdout and "team/bad" not in listed.stdout
    assert listed.stderr == (f"warning: team/bad@1 is damaged and not listed: its manifest blob {bad[:19]}... is "
                             "missing; fix: `adapterhub rm team/bad@1` (or restore the blob and run `adapterhub "
                             "reindex`).\n")
    verified = registry_cli("verify")
    assert verified.exit_code == 1 and "error[manifest] team/bad@1: the manifest of 'team/bad@1' is missing" in \
        verified.stdout
    assert registry_cli("reindex").exit_code == 0
    assert registry_cli("push", ADAPTERS_LIB / "minilm_lora_all", "team/other").exit_code == 0
    assert registry_cli("rm", "team/bad@1").exit_code == 0
    assert registry_cli("verify").exit_code == 0
    assert registry_cli("list").stderr == ""


def test_re_pushing_repairs_a_corrupt_blob(registry_cli, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ADAPTERS_LIB / "llama_lora", src)
    registry_cli("push", src, "team/x")
    manifest = json.loads(registry_cli("show", "team/x", "--json").output)["manifest"]
    weights = next(f for f in manifest["files"] if f["path"] == "adapter.safetensors")["sha256"]
    blob = _blob(tmp_path, weights)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[200] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = registry_cli("pull", "team/x", "-o", tmp_path / "bad")
    assert bad.exit_code == 1 and "fix: re-push the adapter" in bad.stderr
    fixed = registry_cli("push", src, "team/x")  # the fix, as printed
    assert fixed.exit_code == 0
    assert fixed.stdout.splitlines()[0] == ("team/x@1 already holds identical content; nothing pushed "
                                            "(use --allow-duplicate to make a new version)")
    assert "repaired the damaged stored copy of: adapter.safetensors" in fixed.stderr
    assert registry_cli("verify").exit_code == 0
    assert registry_cli("pull", "team/x", "-o", tmp_path / "good", "--format", "adapters").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (tmp_path / "good" / p.name).read_bytes() == p.read_bytes()


def test_push_lists_what_it_left_out_and_duplicates_are_said_so(registry_cli, tmp_path):
    src = tmp_path / "run"
    shutil.copytree(ADAPTERS_LIB / "minilm_lora", src)
    (src / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    (src / "notes.txt").write_text("x")
    first = registry_cli("push", src, "x", "--tag", "prod")
    assert first.exit_code == 0
    assert first.stderr == ("left out (not part of an adapter; --include GLOB or --include-all stores them, pickles "
                            "also need --allow-pickle): notes.txt, optimizer.pt (pickle)\n")
    again = registry_cli("push", src, "x", "--tag", "stable")
    assert again.exit_code == 0
    assert again.stdout.splitlines()[0] == ("x@1 already holds identical content; nothing pushed (use "
                                            "--allow-duplicate to make a new version)")
    assert "tags not applied: stable" in again.stderr
    assert registry_cli("push", src, "x", "--allow-duplicate").stdout.split()[0] == "x@2"
    assert registry_cli("push", src, "x", "--include", "*.pt").exit_code == 2
    assert registry_cli("push", src, "x", "--include", "notes.txt").stdout.split()[0] == "x@3"


def test_pull_defaults_to_peft_for_a_blend_and_show_prints_r_alpha_targets(registry_cli, tmp_path):
    import torch
    from conftest import peft_outputs

    a, b = ADAPTERS_LIB / "llama_lora", ADAPTERS_LIB / "llama_lora_all"
    blended = registry_cli("blend", a, b, "--weights", "0.6,0.4", "--method", "cat", "--push", "team/blend")
    assert blended.exit_code == 0, blended.output
    again = registry_cli("blend", a, b, "--weights", "0.6,0.4", "--method", "cat", "--push", "team/blend")
    assert again.stdout.splitlines()[0] == "team/blend@1 already holds identical content; nothing pushed"
    pulled = registry_cli("pull", "team/blend", "-o", tmp_path / "pulled")
    assert pulled.exit_code == 0
    assert pulled.stderr == ("note: converted from the stored adapterhub format to PEFT (--format adapterhub writes "
                             "the stored files)\n")
    assert (tmp_path / "pulled" / "adapter_config.json").is_file()
    direct = registry_cli("blend", a, b, "--weights", "0.6,0.4", "--method", "cat", "-o", tmp_path / "direct")
    assert direct.exit_code == 0
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    base = ADAPTERS_LIB / "tiny_llama_base"
    assert torch.equal(peft_outputs(base, tmp_path / "pulled", ids), peft_outputs(base, tmp_path / "direct", ids))
    stored = registry_cli("pull", "team/blend", "-o", tmp_path / "stored", "--format", "adapterhub")
    assert stored.exit_code == 0 and stored.stderr == "" and (tmp_path / "stored" / "adapterhub.json").is_file()

    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/lora")
    text = registry_cli("show", "team/lora").stdout
    assert "targets     12 modules (query, value)" in text and "ranks       r=8 alpha=16;" in text
    shown = json.loads(registry_cli("show", "team/lora", "--json").stdout)
    assert shown["adapter"]["lora"]["r"] == 8 and shown["adapter"]["lora"]["alpha"] == 16
    assert shown["adapter"]["targets"]["leaf_names"] == ["query", "value"]
    registry_cli("push", ADAPTERS_LIB / "minilm_seq_bn", "team/bn")
    assert "bottleneck  seq_bn, hidden 384" in registry_cli("show", "team/bn").stdout
    digest = shown["digest"]
    assert json.loads(registry_cli("show", f"team/lora@{digest[:15]}", "--json").stdout)["ref"] == "team/lora@1"
    short = registry_cli("show", f"team/lora@{digest[:14]}")
    assert short.exit_code == 2 and "at least 8 digits" in short.stderr


def test_gc_temp_grace_and_what_gc_prints(registry_cli, tmp_path):
    import os
    import time

    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "a")
    registry_cli("push", ADAPTERS_LIB / "llama_lora", "b")
    registry_cli("rm", "b@1")
    old = tmp_path / "reg" / "tmp" / "blob-from-an-older-adapterhub"
    old.write_bytes(b"z" * 100)
    dry = registry_cli("gc", "--dry-run")
    assert dry.stdout.startswith("would remove 5 blob(s), 0 snapshot(s), 0 staging leftover(s): would free ")
    assert registry_cli("gc").stdout.startswith("removed 5 blob(s), 0 snapshot(s), 0 staging leftover(s): freed ")
    assert old.exists(), "an unowned, fresh staging file waits for the grace period"
    os.utime(old, (time.time() - 10, time.time() - 10))
    done = json.loads(registry_cli("gc", "--temp-grace", "5", "--json").stdout)
    assert done["temp"] == [str(old)] and done["freed_size"] == 100 and done["kept"] == [] and not old.exists()
    assert registry_cli("gc", "--temp-grace", "-1").exit_code == 2


REGISTRY_COMMANDS = ("push", "pull", "list", "show", "tag", "untag", "rm", "gc", "verify", "reindex", "sync", "du",
                     "remote")


def test_registry_help_lines_are_complete():
    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    listing = result.output.split("Commands:\n", 1)[1].splitlines()
    seen = set()
    for line in listing:
        name, _, text = line.strip().partition(" ")
        if name in REGISTRY_COMMANDS:
            seen.add(name)
            assert text.strip().endswith(".") and not text.strip().endswith("..."), line
    assert seen == set(REGISTRY_COMMANDS)
    for name in REGISTRY_COMMANDS:
        command = cli.commands[name]
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help and param.help.rstrip().endswith((".", ")")), (name, param.name)
        page = CliRunner().invoke(cli, [name, "--help"], terminal_width=80).output
        assert "..." not in page.replace("COMMAND [ARGS]...", ""), name
    for sub in cli.commands["remote"].commands.values():
        for param in sub.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help and param.help.rstrip().endswith((".", ")")), (sub.name, param.name)


@pytest.fixture
def read_only_registry(tmp_path):
    import contextlib
    import os
    import subprocess

    root = tmp_path / "reg"

    @contextlib.contextmanager
    def _ro():
        if os.geteuid() == 0:
            if subprocess.run(["mount", "--bind", str(root), str(root)], capture_output=True).returncode:
                pytest.skip("cannot bind-mount")
            try:
                subprocess.run(["mount", "-o", "remount,ro,bind", str(root)], check=True, capture_output=True)
                yield
            finally:
                subprocess.run(["umount", "-l", str(root)], check=False)
        else:
            paths = [root, *root.rglob("*")]
            modes = {p: p.stat().st_mode for p in paths if not p.is_symlink()}
            for p in sorted(modes, key=lambda p: -len(p.parts)):
                os.chmod(p, modes[p] & ~0o222)
            try:
                yield
            finally:
                for p in sorted(modes, key=lambda p: len(p.parts)):
                    os.chmod(p, modes[p])

    return _ro


def test_read_commands_work_on_a_read_only_registry_and_writes_fail_in_one_line(registry_cli, read_only_registry,
                                                                                   tmp_path):
    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "team/a", "--tag", "prod")
    registry_cli("push", ADAPTERS_LIB / "llama_lora", "team/b")
    with read_only_registry():
        for args in (["list"], ["list", "--json"], ["show", "team/a@prod"], ["verify"],
                     ["pull", "team/a", "-o", tmp_path / "out", "--format", "peft"], ["gc", "--dry-run"]):
            result = registry_cli(*args)
            assert result.exit_code == 0, (args, result.output)
            assert "warning" not in result.stderr and "error" not in result.stderr, (args, result.stderr)
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
        for args in (["push", ADAPTERS_LIB / "minilm_seq_bn", "c"], ["tag", "team/a@1", "t"], ["rm", "team/a@1"],
                     ["gc"], ["reindex"], ["untag", "team/a", "prod"]):
            result = registry_cli(*args)
            assert result.exit_code == 1, (args, result.output)
            lines = result.stderr.splitlines()
            assert lines[0].startswith("error: cannot ") and lines[0].endswith(f"the registry at {tmp_path / 'reg'} "
                                                                               "is read-only.")
            assert len(lines) == 2 and lines[1].startswith("  fix: ") and "Traceback" not in result.output


def test_rm_of_a_tag_is_refused_and_names_both_fixes(registry_cli):
    registry_cli("push", ADAPTERS_LIB / "minilm_lora", "t/a", "--tag", "prod")
    result = registry_cli("rm", "t/a@prod")
    assert result.exit_code == 2
    assert result.stderr == ("error: 't/a@prod' is a tag (it points at t/a@1); rm takes a version.\n"
                             "  fix: `adapterhub untag t/a prod` removes the tag; `adapterhub rm t/a@1` removes the "
                             "version.\n")
    assert registry_cli("rm", "t/a@latest").exit_code == 2
    assert registry_cli("show", "t/a@1").exit_code == 0, "nothing was removed"
    assert registry_cli("rm", "t/a@1").exit_code == 0


@pytest.mark.parametrize("argv", [["list"], ["show", "a/b"], ["pull", "a/b", "-o", "{tmp}/out"], ["verify"], ["du"],
                                  ["gc"], ["reindex"], ["tag", "a/b@1", "t"], ["untag", "a/b", "t"], ["rm", "a/b@1"]])
def test_a_read_command_on_a_mistyped_registry_path_creates_nothing(argv, tmp_path):
    """`--registry /typo/sub list` used to build a whole registry there, parent folders included."""
    typo = tmp_path / "typo" / "sub"
    r = CliRunner().invoke(cli, ["--registry", str(typo), *(a.format(tmp=tmp_path) for a in argv)])
    assert r.exit_code == 1
    assert r.output == (f"error: no adapterhub registry at {typo}.\n  fix: check the path (--registry or "
                        "$ADAPTERHUB_REGISTRY); `adapterhub push` creates a registry there.\n")
    assert list(tmp_path.iterdir()) == []


def test_push_and_an_import_create_the_registry(tmp_path):
    src = tmp_path / "src"
    pushed = CliRunner().invoke(cli, ["--registry", str(src), "push", str(ADAPTERS_LIB / "minilm_lora"), "t/a"])
    assert pushed.exit_code == 0, pushed.output
    dst = tmp_path / "new" / "reg"
    r = CliRunner().invoke(cli, ["--registry", str(dst), "pull", "t/a@1", "--from", str(src)])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(cli, ["--registry", str(dst), "list"]).output.splitlines()[1].startswith("t/a@1 ")


@pytest.mark.parametrize("argv", [["run", "a/b@1", "--base", "{base}", "--ids", "1,2"],
                                  ["export", "a/b@1", "--base", "{base}", "-o", "{tmp}/out"],
                                  ["blend", "a/b@1", "a/c@1", "-o", "{tmp}/out"]])
def test_commands_that_read_references_on_a_mistyped_registry_create_nothing(argv, tmp_path):
    """run, export and blend -o resolved their references through a registry they created at a typo."""
    typo = tmp_path / "typo" / "sub"
    args = [a.format(tmp=tmp_path, base=ADAPTERS_LIB / "tiny_llama_base") for a in argv]
    r = CliRunner().invoke(cli, ["--registry", str(typo), *args])
    assert r.exit_code == 1, r.output
    assert r.output.endswith(f"error: no adapterhub registry at {typo}.\n  fix: check the path (--registry or "
                             "$ADAPTERHUB_REGISTRY); `adapterhub push` creates a registry there.\n")
    assert list(tmp_path.iterdir()) == []


def test_a_read_command_on_a_mistyped_file_url_creates_nothing_and_push_and_blend_push_create(tmp_path):
    typo = tmp_path / "typo" / "sub"
    r = CliRunner().invoke(cli, ["--registry", f"file://{typo}", "list"])
    assert r.exit_code == 1 and f"no adapterhub registry at {typo}" in r.output, r.output
    assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(cli, ["--registry", f"file://{typo}", "push", str(ADAPTERS_LIB / "minilm_lora"), "t/a"])
    assert r.exit_code == 0, r.output
    other = tmp_path / "blended"
    r = CliRunner().invoke(cli, ["--registry", str(other), "blend", str(ADAPTERS_LIB / "minilm_lora"), "--push", "t/b"])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(cli, ["--registry", f"file://{other}", "list"]).output.splitlines()[1].startswith("t/b@1")
