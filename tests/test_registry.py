"""The versioned registry: on-disk format, references, location, pull, verify/gc, index, crash safety,
concurrency and storage errors. Everything runs on real adapter directories in tmp_path.

The crash and race tests run tests/registry_worker.py in subprocesses (see its docstring).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import ADAPTERS_LIB, load_base, make_llama, peft_outputs, perturb_
from peft import LoraConfig
from safetensors.torch import load_file

import adapterhub
from adapterhub.errors import (
    AdapterHubError,
    IntegrityError,
    InvalidReferenceError,
    NotFoundError,
    OutputPathError,
    PickleRefusedError,
    RegistryError,
    StorageError,
    VersionExistsError,
)
from adapterhub.formats import detect, read_adapter
from adapterhub.registry import Registry
from adapterhub.registry.registry import PullFormat, canonical_json

WORKER = Path(__file__).with_name("registry_worker.py")
LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"
MINILM_LORA = ADAPTERS_LIB / "minilm_lora"
LLAMA_LORA = ADAPTERS_LIB / "llama_lora"
IS_ROOT = os.geteuid() == 0


# --- helpers -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blob_path(root: Path, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return root / "blobs" / "sha256" / hexd[:2] / hexd[2:]


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs" / "sha256").rglob("*") if p.is_file())


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below root with what would show a write: type, size, mode, mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (p.is_dir(), st.st_size, st.st_mode, st.st_mtime_ns)
    return out


def disk_refs(root: Path) -> dict[tuple[str, str], str]:
    """(name, version) -> manifest digest, read straight from the ref files (no registry code)."""
    out = {}
    refs = root / "refs"
    for vfile in sorted(refs.glob("*/*/versions/*")):
        ns, short = vfile.parent.parent.parent.name, vfile.parent.parent.name
        name = short if ns == "_" else f"{ns}/{short}"
        out[(name, vfile.name)] = vfile.read_text().strip()
    return out


def check_version_on_disk(root: Path, name: str, version: str, digest: str) -> dict:
    """Manifest and every file blob present and hashing to their names; returns the manifest."""
    mpath = blob_path(root, digest)
    assert sha256_file(mpath) == digest, f"{name}@{version}: manifest blob does not hash to its name"
    manifest = json.loads(mpath.read_bytes())
    assert (manifest["name"], manifest["version"]) == (name, version)
    for f in manifest["files"]:
        b = blob_path(root, "sha256:" + f["sha256"])
        assert b.is_file(), f"{name}@{version}: blob of {f['path']} missing"
        assert b.stat().st_size == f["size"]
        assert sha256_file(b) == "sha256:" + f["sha256"], f"{name}@{version}: {f['path']} corrupt"
    return manifest


def dir_hashes(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def corrupt_blob(path: Path, offset: int | None = None) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def file_blob(reg: Registry, ref: str, rel: str) -> Path:
    f = next(f for f in reg.manifest(ref)["files"] if f["path"] == rel)
    return blob_path(reg.root, "sha256:" + f["sha256"])


def hand_made_version(reg: Registry, name: str, from_version: str, version: str, *, mark_dirty: bool = True) -> str:
    """Write a complete version the way a push does up to its commit point (manifest blob, dirty mark in the
    index, version ref) and stop there: what a push killed right after creating the ref leaves behind."""
    if mark_dirty:
        reg.index.mark_dirty(name)
    manifest = dict(reg.manifest(f"{name}@{from_version}"))
    manifest["version"] = version
    manifest["created_at"] = "2999-01-01T00:00:00.000000Z"
    digest = reg.store.put_bytes(canonical_json(manifest))
    ns, _, short = name.rpartition("/")
    ref = reg.root / "refs" / (ns or "_") / short / "versions" / version
    ref.write_text(digest + "\n")
    return digest


def raw_index(root: Path, sql: str) -> list[tuple]:
    """Query index.sqlite directly, bypassing the registry (whose index property repairs on access)."""
    import sqlite3

    db = sqlite3.connect(root / "index.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def run_worker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def unwritable(path: Path):
    """Make a directory refuse new entries even for root: chmod 0555 as a user, chattr +i as root."""
    if IS_ROOT:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root and chattr +i is not available on this file system")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, mode)


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    """A real PEFT LoRA (r=128 on every linear of a 256-wide Llama) with a ~4 MB adapter_model.safetensors."""
    from peft import get_peft_model

    model = make_llama(0, hidden_size=256, intermediate_size=512)
    peft_model = get_peft_model(model, LoraConfig(r=128, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    perturb_(peft_model, 11)
    out = tmp_path_factory.mktemp("big") / "adapter"
    peft_model.save_pretrained(out)
    assert 4_000_000 <= (out / "adapter_model.safetensors").stat().st_size <= 8_000_000
    return out


@pytest.fixture
def minilm_plus(tmp_path) -> Path:
    """minilm_lora plus a model card: shares both of minilm_lora's files, adds one of its own."""
    d = tmp_path / "minilm_plus"
    shutil.copytree(MINILM_LORA, d)
    (d / "README.md").write_text("trained for 3 epochs\n" * 50)
    return d


# --- 1. on-disk format ---------------------------------------------------------------------------


def test_blobs_are_content_addressed_read_only_and_stored_once(tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    a1 = reg.push(MINILM_LORA, "team/a")
    b1 = reg.push(MINILM_LORA, "b")
    a2 = reg.push(MINILM_LORA, "team/a", allow_duplicate=True)
    assert (a1.version, a2.version, b1.version) == ("1", "2", "1")
    assert len({a1.digest, a2.digest, b1.digest}) == 3, "each version has its own manifest"

    blobs = blob_files(root)
    n_files = len([p for p in MINILM_LORA.iterdir() if p.is_file()])
    assert len(blobs) == n_files + 3, "shared files must be stored once, plus one manifest per version"
    for p in blobs:
        assert p.parent.parent == root / "blobs" / "sha256"
        assert len(p.parent.name) == 2 and len(p.name) == 62
        assert sha256_file(p) == f"sha256:{p.parent.name}{p.name}", f"{p} does not hash to its name"
        assert p.stat().st_mode & 0o777 == 0o444, f"{p} is not read-only"
    for f in MINILM_LORA.iterdir():
        assert blob_path(root, sha256_file(f)).is_file()

    before = blob_files(root)
    reg.push(LLAMA_LORA, "team/c")
    added = set(blob_files(root)) - set(before)
    assert len(added) == len([p for p in LLAMA_LORA.iterdir() if p.is_file()]) + 1


def test_manifest_digest_fields_and_ref_file(tmp_path, minilm_dir):
    root = tmp_path / "reg"
    reg = Registry(root)
    parents = [{"name": "team/x", "version": "1", "digest": "sha256:" + "a" * 64}]
    recipe = {"op": "linear", "weights": [0.5, 0.5]}
    res = reg.push(MINILM_LORA, "team/sent@1.0", tags=["stable"], description="a minilm lora",
                   metrics={"acc": 0.91, "f1": {"macro": 0.88}}, base=minilm_dir, parents=parents, recipe=recipe)
    assert res.created and (res.name, res.version) == ("team/sent", "1.0")

    mpath = blob_path(root, res.digest)
    raw = mpath.read_bytes()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == res.digest
    assert (root / "refs" / "team" / "sent" / "versions" / "1.0").read_text().strip() == res.digest
    m = json.loads(raw)
    assert m == res.manifest == reg.manifest("team/sent@1.0") == reg.show("team/sent")["manifest"]

    assert m["kind"] == "lora" and m["format"] == "adapters"
    assert m["spec"]["r"] == 8 and m["spec"]["alpha"] == 16
    assert m["base"]["name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert set(m["base"]) >= {"name_or_path", "revision", "fingerprint"}
    assert m["base"]["fingerprint"], "pushing with base= records the base's fingerprint"
    want_files = {p.name: (sha256_file(p).removeprefix("sha256:"), p.stat().st_size)
                  for p in MINILM_LORA.iterdir() if p.is_file()}
    assert {f["path"]: (f["sha256"], f["size"]) for f in m["files"]} == want_files
    created = datetime.fromisoformat(m["created_at"].replace("Z", "+00:00"))
    assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 120
    assert m["description"] == "a minilm lora"
    assert m["tags"] == ["stable"]
    assert m["metrics"] == {"acc": 0.91, "f1": {"macro": 0.88}}
    assert m["parents"] == parents and m["recipe"] == recipe

    by_digest = reg.resolve(f"team/sent@{res.digest}")
    assert (by_digest.version, by_digest.digest) == ("1.0", res.digest)
    assert reg.resolve("team/sent@stable").digest == res.digest


def test_latest_follows_newest_push_unless_moved(tmp_path, minilm_plus):
    reg = Registry(tmp_path / "reg")
    v1 = reg.push(MINILM_LORA, "x")
    assert reg.resolve("x").version == reg.resolve("x@latest").version == "1"
    v2 = reg.push(minilm_plus, "x")
    assert reg.resolve("x").version == "2" and reg.resolve("x").digest == v2.digest
    reg.tag("x@1", "latest")
    assert reg.resolve("x").digest == v1.digest
    reg.push(LLAMA_LORA, "x")
    assert reg.resolve("x").version == "1", "a pinned latest does not move on push"
    assert [i.version for i in reg.list(tag="latest")] == ["1"]
    reg.untag("x", "latest")
    assert reg.resolve("x").version == "3", "untagged, latest follows the newest push again"
    assert [i.version for i in reg.list(tag="latest")] == ["3"]
    with pytest.raises(NotFoundError):
        reg.untag("x", "latest")
    reg.rm("x@3")
    assert reg.resolve("x").version == "2"


def test_a_push_that_fails_after_its_blobs_leaves_no_version_and_latest_intact(tmp_path, minilm_plus):
    """The name's directory refuses writes (so `newest` cannot be updated): the push must fail with a
    StorageError and leave no version behind; a version that exists although its push failed, and that
    `latest` does not name, is exactly the half-done push the issue forbids."""
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "x")
    reg.push(minilm_plus, "x")
    reg.close()
    before = disk_refs(root)
    with unwritable(root / "refs" / "_" / "x"), pytest.raises(StorageError) as e:
        Registry(root).push(LLAMA_LORA, "x")
    assert "fix:" in str(e.value)
    fresh = Registry(root)
    assert fresh.verify().ok
    newest = max(int(v) for n, v in disk_refs(root) if n == "x")
    assert fresh.resolve("x").version == str(newest), "latest must name the newest complete version"
    assert disk_refs(root) == before, "the failed push left a version behind"


# --- 2. references -------------------------------------------------------------------------------

BAD_TARGETS = ["../x", "/abs", "a\\b", "Team/x", "a//b", "\uff41", "", "a/b/c", "ns/", "/x", "x/", "x@..",
               "x@sha256:12", "x@", "x@1@2", "x@latest", "x@LATEST", "x@sha256:" + "0" * 64, ".x", "-x", "x/..",
               "ns/.hidden", "x\n", " x", "x ", "a" * 65, "te\u0430m/x", "x@v/1", "x@1 ", "\u212a", "x\x00"]


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_invalid_names_are_rejected_before_touching_disk(target, tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "good")
    before = tree(root)
    with pytest.raises(InvalidReferenceError) as e:
        reg.push(MINILM_LORA, target)
    assert str(e.value)
    # checked before the source is even read
    with pytest.raises(InvalidReferenceError):
        reg.push(tmp_path / "does-not-exist", target)
    assert tree(root) == before, "a rejected push wrote something"


@pytest.mark.parametrize("ref", ["../x", "/abs", "a\\b", "Team/x", "a//b", "\uff41", "", "a/b/c", "ns/",
                                 "x@..", "x@sha256:12", "x@", "x@1@2", "good@sha256:" + "G" * 64, "x@A"])
def test_invalid_references_are_rejected_everywhere(ref, tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "good")
    before = tree(root)
    for call in (lambda: reg.resolve(ref), lambda: reg.manifest(ref), lambda: reg.show(ref),
                 lambda: reg.rm(ref), lambda: reg.load(ref), lambda: reg.pull(ref, tmp_path / "out"),
                 lambda: reg.tag(ref, "t"), lambda: adapterhub.load(ref, registry=root)):
        with pytest.raises(InvalidReferenceError):
            call()
    assert tree(root) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tag", ["../t", "T", "", "a/b", "sha256:" + "0" * 64, "t@1", "\uff54"])
def test_invalid_tags_are_rejected_before_touching_disk(tag, tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "good")
    before = tree(root)
    with pytest.raises(InvalidReferenceError):
        reg.push(MINILM_LORA, "good", tags=[tag])
    with pytest.raises(InvalidReferenceError):
        reg.tag("good@1", tag)
    with pytest.raises(InvalidReferenceError):
        reg.untag("good", tag)
    assert tree(root) == before


def test_valid_reference_forms_resolve(tmp_path, minilm_plus):
    reg = Registry(tmp_path / "reg")
    v1 = reg.push(MINILM_LORA, "ns-1/my_name.v2")
    v2 = reg.push(minilm_plus, "ns-1/my_name.v2", tags=["prod"])
    rc = reg.push(LLAMA_LORA, "ns-1/my_name.v2@rc-1")
    name = "ns-1/my_name.v2"
    assert reg.resolve(name).version == "rc-1"
    assert reg.resolve(f"{name}@1").digest == v1.digest
    assert reg.resolve(f"{name}@2").digest == v2.digest
    assert reg.resolve(f"{name}@prod").digest == v2.digest
    assert reg.resolve(f"{name}@rc-1").digest == rc.digest
    for r in (v1, v2, rc):
        assert reg.resolve(f"{name}@{r.digest}").version == r.version
    with pytest.raises(NotFoundError):
        reg.resolve(f"{name}@sha256:" + "0" * 64)
    with pytest.raises(NotFoundError):
        reg.resolve(f"{name}@9")
    with pytest.raises(NotFoundError):
        reg.resolve("other")
    assert reg.push(MINILM_LORA, name, allow_duplicate=True).version == "3", \
        "the next integer ignores non-integer versions"


def test_versions_number_and_identical_push_is_a_noop(tmp_path, minilm_plus):
    root = tmp_path / "reg"
    reg = Registry(root)
    assert [reg.push(MINILM_LORA, "x", allow_duplicate=True).version for _ in range(3)] == ["1", "2", "3"]
    first = reg.resolve("x@1")
    before_refs, before_list = tree(root / "refs"), reg.list()

    again = reg.push(MINILM_LORA, "x@1")
    assert again.created is False and again.version == "1" and again.digest == first.digest
    assert tree(root / "refs") == before_refs and reg.list() == before_list

    with pytest.raises(VersionExistsError) as e:
        reg.push(minilm_plus, "x@1")
    assert "x@1" in str(e.value)
    assert tree(root / "refs") == before_refs and reg.list() == before_list
    assert reg.resolve("x@1").digest == first.digest
    assert reg.verify().ok
    assert reg.push(minilm_plus, "x").version == "4"


# --- 3. location ---------------------------------------------------------------------------------


def test_location_from_environment_variable(tmp_path, monkeypatch):
    target = tmp_path / "env" / "registry"
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(target))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert not target.exists()
    reg = Registry(None)
    assert reg.root == target
    assert (target / "registry.json").is_file(), "created on first use"
    reg.push(MINILM_LORA, "x", tags=["t"])
    assert adapterhub.load("x@t").kind == "lora"
    assert Registry().resolve("x").version == "1"
    assert not (tmp_path / "xdg").exists()


def test_location_from_xdg_data_home_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTERHUB_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    reg = Registry(None)
    assert reg.root == tmp_path / "xdg" / "adapterhub" / "registry"
    assert (reg.root / "registry.json").is_file()
    reg.push(MINILM_LORA, "x")
    assert adapterhub.load("x").kind == "lora"

    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    reg = Registry()
    assert reg.root == tmp_path / "home" / ".local" / "share" / "adapterhub" / "registry"
    assert (reg.root / "registry.json").is_file()


def test_many_processes_creating_one_registry_at_once(tmp_path):
    """First use by several processes at the same moment (e.g. jobs pushing to a fresh per-user registry):
    each must open it; none may mistake the marker another just wrote for a foreign directory."""
    procs, rounds = 16, 100
    p = run_worker("init-race", str(tmp_path), str(procs), str(rounds), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    errors = [line for line in p.stdout.splitlines() if line.startswith("ERROR")]
    assert p.stdout.splitlines()[-1] == f"OPENS {procs * rounds}"
    assert not errors, f"{len(errors)} of {procs * rounds} concurrent first opens failed, e.g. {errors[:3]}"
    for k in range(rounds):
        assert Registry(tmp_path / f"r{k}").verify().ok


def test_refuses_a_directory_that_is_not_a_registry(tmp_path):
    d = tmp_path / "stuff"
    d.mkdir()
    (d / "mine.txt").write_text("keep me")
    with pytest.raises(RegistryError):
        Registry(d)
    assert [p.name for p in d.iterdir()] == ["mine.txt"]


# --- 4. pull -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy", "link", "convert", "overwrite"])
def test_pull_detects_a_corrupt_blob_and_writes_nothing(mode, tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.push(LLAMA_LORA, "x")
    blob = file_blob(reg, "x", "adapter.safetensors")
    expected = "sha256:" + blob.parent.name + blob.name
    corrupt_blob(blob)
    actual = sha256_file(blob)
    out_parent = tmp_path / "pulls"
    out_parent.mkdir()
    out = out_parent / "out"
    if mode == "overwrite":
        out.mkdir()
        (out / "adapter_config.json").write_text("previous pull")
    with pytest.raises(IntegrityError) as e:
        if mode == "copy":
            reg.pull("x", out)
        elif mode == "link":
            reg.pull("x", out, link=True)
        elif mode == "convert":
            reg.pull("x", out, format="peft")
        else:
            reg.pull("x", out, overwrite=True)
    err = e.value
    assert Path(err.path) == blob and err.expected == expected and err.actual == actual
    msg = str(err)
    assert str(blob) in msg and expected in msg and actual in msg
    if mode == "overwrite":
        previous = {"adapter_config.json": sha256_file(out / "adapter_config.json")}
        assert dir_hashes(out) == previous, "the previous content must survive"
        assert [p.name for p in out_parent.iterdir()] == ["out"]
    else:
        assert not out.exists()
        assert list(out_parent.iterdir()) == [], "no partial output or temp dir may be left"
    with pytest.raises(IntegrityError):
        reg.load("x")


def test_pull_refuses_non_empty_directory_unless_overwrite(tmp_path):
    reg = Registry(tmp_path / "reg")
    res = reg.push(MINILM_LORA, "x")
    want = {f["path"]: "sha256:" + f["sha256"] for f in res.manifest["files"]}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdapterHubError):
        reg.pull("x", out)
    with pytest.raises(OutputPathError, match="holds no adapter or model"):  # not something a pull wrote
        reg.pull("x", out, overwrite=True)
    assert dir_hashes(out) == {"keep.txt": sha256_file(out / "keep.txt")}
    reg.pull("x", tmp_path / "earlier")
    reg.pull("x", tmp_path / "earlier", overwrite=True)  # an earlier pull is replaced
    assert dir_hashes(tmp_path / "earlier") == want
    empty = tmp_path / "empty"
    empty.mkdir()
    reg.pull("x", empty)
    assert dir_hashes(empty) == want == dir_hashes(MINILM_LORA)


def test_pulled_peft_adapter_loads_in_peft(tmp_path, llama_base, make_peft):
    src = make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                    seed=3)
    reg = Registry(tmp_path / "reg")
    res = reg.push(src, "team/peft-lora", tags=["prod"])
    assert res.manifest["format"] == "peft"
    out = reg.pull("team/peft-lora@prod", tmp_path / "pulled")
    assert dir_hashes(out) == dir_hashes(src)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model = load_base(llama_base)
    want = peft_outputs(llama_base, src, ids)
    got = peft_outputs(llama_base, out, ids, model=model)
    assert torch.equal(got, want)
    with torch.no_grad():
        plain = load_base(llama_base)(input_ids=ids).logits
    assert not torch.allclose(plain, want, atol=1e-4), "the adapter must change the output"


@pytest.mark.parametrize("name", ["llama_lora_all", "llama_lora"])
def test_pull_as_peft_of_an_adapters_lib_lora_loads_in_peft(name, tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.push(ADAPTERS_LIB / name, "lib/lora").manifest["format"] == "adapters"
    out = reg.pull("lib/lora", tmp_path / "as-peft", format="peft")
    assert detect(out) == "peft"
    ref = load_file(ADAPTERS_LIB / f"{name}.reference.safetensors")
    got = peft_outputs(LLAMA_BASE, out, ref["input_ids"])
    assert torch.allclose(got, ref["logits"], atol=2e-5, rtol=1e-4), (got - ref["logits"]).abs().max()
    assert not torch.allclose(ref["logits"], ref["base_output"], atol=1e-3)


def test_pull_link_gives_hard_links_to_the_blobs(tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    res = reg.push(LLAMA_LORA, "x")
    out = reg.pull("x", tmp_path / "linked", link=True)
    assert dir_hashes(out) == dir_hashes(LLAMA_LORA)
    for f in res.manifest["files"]:
        blob = blob_path(root, "sha256:" + f["sha256"])
        assert os.stat(out / f["path"]).st_ino == os.stat(blob).st_ino
        assert os.stat(blob).st_nlink >= 2
    copied = reg.pull("x", tmp_path / "copied")
    for f in res.manifest["files"]:
        assert os.stat(copied / f["path"]).st_ino != os.stat(blob_path(root, "sha256:" + f["sha256"])).st_ino


def _spy_hashes(monkeypatch) -> list[Path]:
    """Every file the registry hashes (the real hash_file still runs)."""
    from adapterhub.registry import registry as registry_module
    from adapterhub.registry import store

    hashed: list[Path] = []
    real = store.hash_file

    def spy(path, progress=None):
        hashed.append(Path(path))
        return real(path, progress)

    monkeypatch.setattr(store, "hash_file", spy)
    monkeypatch.setattr(registry_module, "hash_file", spy)
    return hashed


def test_copy_pull_trusts_an_unchanged_stamp_and_verify_rehashes_every_file(tmp_path, monkeypatch):
    hashed = _spy_hashes(monkeypatch)
    reg = Registry(tmp_path / "reg")
    reg.push(LLAMA_LORA, "x")
    blobs = sorted(file_blob(reg, "x", f["path"]) for f in reg.manifest("x")["files"])
    hashed.clear()
    out = reg.pull("x", tmp_path / "copy")
    assert dir_hashes(out) == dir_hashes(LLAMA_LORA)
    assert hashed == [], "blobs hashed at push and untouched since are copied without being read again"
    progress: list[int] = []
    reg.pull("x", tmp_path / "verified", verify=True, progress=progress.append)
    assert sorted(hashed) == blobs, "verify=True re-hashes every blob"
    assert sum(progress) == sum(f["size"] for f in reg.manifest("x")["files"])
    hashed.clear()
    reg.pull("x", tmp_path / "linked", link=True, verify=True)
    assert sorted(hashed) == blobs, "so does a link pull with verify=True"
    hashed.clear()
    reg.pull("x", tmp_path / "linked-again", link=True)
    reg.pull("x", tmp_path / "copy-after-links")
    assert hashed == [], "a hard link changes only the blob's link count and ctime: its stamp is renewed"
    weights = file_blob(reg, "x", "adapter.safetensors")
    os.chmod(weights, 0o444)  # ctime changes: the stamp no longer vouches for the bytes
    hashed.clear()
    reg.pull("x", tmp_path / "after-chmod")
    assert hashed == [weights], "a blob whose stamp changed is hashed while it is copied"
    hashed.clear()
    progress.clear()
    reg.pull("x", tmp_path / "again", progress=progress.append)
    assert hashed == [], "hashed and intact: its new stamp is recorded"
    assert sum(progress) == sum(f["size"] for f in reg.manifest("x")["files"]), "progress counts trusted bytes"


def test_damage_that_keeps_the_stat_stamp_is_caught_by_pull_verify(tmp_path):
    """Bit rot below the file system changes no stat field: a plain pull trusts the stamp (the
    documented trade-off, as git's checkout does); ``verify=True`` and ``verify()`` catch it."""
    reg = Registry(tmp_path / "reg")
    reg.push(LLAMA_LORA, "x")
    weights = file_blob(reg, "x", "adapter.safetensors")
    digest = "sha256:" + weights.parent.name + weights.name
    corrupt_blob(weights)
    reg.index.stamp(digest, reg._stat_stamp(digest))  # what the disk's silent corruption looks like to stat
    out = reg.pull("x", tmp_path / "trusted")
    assert sha256_file(out / "adapter.safetensors") == sha256_file(weights) != digest
    for link in (False, True):
        dest = tmp_path / f"verified-{link}"
        with pytest.raises(IntegrityError) as e:
            reg.pull("x", dest, link=link, verify=True)
        assert e.value.expected == digest and not dest.exists()
    with pytest.raises(IntegrityError):
        reg.pull("x", tmp_path / "converted", format="peft", verify=True)
    assert not reg.verify().ok


def test_a_blob_changed_while_a_trusted_copy_runs_is_copied_again_hashed(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    reg.push(LLAMA_LORA, "x")
    weights = file_blob(reg, "x", "adapter.safetensors")
    real = shutil.copyfile
    calls: list[Path] = []

    def copy_then_damage(src, dst, **kw):
        result = real(src, dst, **kw)
        calls.append(Path(src))
        if Path(src) == weights and len(calls) == sum(1 for c in calls if c == weights) == 1:
            corrupt_blob(weights)  # another process writes the blob while (right after) it is copied
        return result

    monkeypatch.setattr(shutil, "copyfile", copy_then_damage)
    parent = tmp_path / "pulls"
    parent.mkdir()
    with pytest.raises(IntegrityError):
        reg.pull("x", parent / "out")
    assert calls.count(weights) == 2, "the changed blob was copied again, hashed"
    assert list(parent.iterdir()) == [], "and the pull left nothing"


# --- 5. verify and gc ----------------------------------------------------------------------------


def test_verify_clean_then_corrupt_blob_is_an_error(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.push(MINILM_LORA, "a")
    reg.push(LLAMA_LORA, "team/b")
    report = reg.verify()
    assert report.ok and report.problems == () and report.versions == 2

    blob = file_blob(reg, "team/b", "adapter.safetensors")
    expected = "sha256:" + blob.parent.name + blob.name
    corrupt_blob(blob, offset=100)
    actual = sha256_file(blob)
    report = reg.verify()
    assert not report.ok
    errors = [p for p in report.problems if p.severity == "error"]
    assert len(errors) == 1
    err = errors[0]
    assert "team/b@1" in err.where and "adapter.safetensors" in err.where
    assert str(blob) in err.message and expected in err.message and actual in err.message


def test_verify_reports_a_corrupt_manifest(tmp_path):
    reg = Registry(tmp_path / "reg")
    res = reg.push(MINILM_LORA, "a")
    corrupt_blob(blob_path(reg.root, res.digest), offset=5)
    report = Registry(reg.root).verify()
    assert not report.ok
    assert any(p.severity == "error" and "a@1" in p.where for p in report.problems)


def test_gc_refuses_while_a_manifest_is_damaged(tmp_path):
    reg = Registry(tmp_path / "reg")
    res = reg.push(MINILM_LORA, "a")
    files = [blob_path(reg.root, "sha256:" + f["sha256"]) for f in reg.manifest("a")["files"]]
    corrupt_blob(blob_path(reg.root, res.digest), offset=5)
    with pytest.raises(RegistryError, match="gc refuses to run"):
        Registry(reg.root).gc()
    assert all(f.is_file() for f in files), "the damaged version's files must survive"


def test_numeric_tags_are_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.push(MINILM_LORA, "a")
    with pytest.raises(InvalidReferenceError, match="reserved for versions"):
        reg.tag("a@1", "3")
    assert reg.push(ADAPTERS_LIB / "minilm_lora_all", "a").version == "2"


def test_orphans_are_listed_and_gc_removes_them(tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "a")
    orphan = reg.store.put_bytes(b"nobody refers to me" * 100)
    leftover = root / "tmp" / "push-leftover"
    leftover.mkdir()
    (leftover / "part").write_bytes(b"x" * 1000)
    stale = root / "tmp" / "blob-stale"
    stale.write_bytes(b"y" * 10)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))

    report = reg.verify()
    assert report.ok, report.problems
    orphans = {(p.what, p.where) for p in report.orphans}
    assert ("blob", str(blob_path(root, orphan))) in orphans
    assert ("staging", str(leftover)) in orphans and ("staging", str(stale)) in orphans

    plan = reg.gc(dry_run=True, temp_grace=0)
    assert plan.blobs == [orphan]
    assert set(plan.temp) == {leftover, stale}
    assert blob_path(root, orphan).stat().st_size == 1900
    assert plan.expected_freed_size == 1900 + 1000 + 10, "the orphan blob and both staging entries"
    assert blob_path(root, orphan).is_file() and leftover.is_dir() and stale.is_file()

    usage = sum(p.stat().st_size for p in blob_files(root))
    # default grace: the fresh, unowned staging dir (maybe of a running older adapterhub) stays
    done = reg.gc()
    assert done.blobs == [orphan] and done.temp == [stale] and done.kept == []
    assert done.freed_size == 1900 + 10
    assert sum(p.stat().st_size for p in blob_files(root)) == usage - 1900
    assert not blob_path(root, orphan).exists() and not stale.exists()
    assert leftover.is_dir()
    assert reg.gc(temp_grace=0).temp == [leftover]
    assert not leftover.exists()
    report = reg.verify()
    assert report.ok and report.orphans == []
    assert reg.pull("a", tmp_path / "out") and dir_hashes(tmp_path / "out") == dir_hashes(MINILM_LORA)


def test_rm_then_gc_frees_unique_blobs_and_keeps_shared(tmp_path, minilm_plus):
    root = tmp_path / "reg"
    reg = Registry(root)
    keep = reg.push(MINILM_LORA, "a")
    gone = reg.push(minilm_plus, "b")
    other = reg.push(LLAMA_LORA, "a")
    unique = {gone.digest, sha256_file(minilm_plus / "README.md")}
    assert reg.gc(dry_run=True).blobs == []

    usage = sum(p.stat().st_size for p in blob_files(root))
    reg.rm("b@1")
    with pytest.raises(NotFoundError):
        reg.resolve("b")
    assert all(blob_path(root, d).is_file() for d in unique), "rm leaves blobs to gc"
    plan = reg.gc(dry_run=True)
    assert set(plan.blobs) == unique
    assert plan.expected_freed_size == sum(blob_path(root, d).stat().st_size for d in unique)
    done = reg.gc()
    assert set(done.blobs) == unique and done.freed_size == plan.expected_freed_size
    assert sum(p.stat().st_size for p in blob_files(root)) == usage - plan.expected_freed_size
    assert not any(blob_path(root, d).exists() for d in unique)
    for res, src in ((keep, MINILM_LORA), (other, LLAMA_LORA)):
        check_version_on_disk(root, res.name, res.version, res.digest)
        assert dir_hashes(reg.pull(res.ref, tmp_path / res.digest[7:15])) == dir_hashes(src)
    report = reg.verify()
    assert report.ok and report.orphans == []


# --- 6. index ------------------------------------------------------------------------------------


def _populate(reg: Registry) -> None:
    reg.push(ADAPTERS_LIB / "minilm_lora", "team/sent", tags=["stable"])
    reg.push(ADAPTERS_LIB / "minilm_lora_all", "team/sent")
    reg.push(ADAPTERS_LIB / "minilm_seq_bn", "team/bn", tags=["stable"])
    reg.push(ADAPTERS_LIB / "llama_lora", "team/llama", base=LLAMA_BASE)
    reg.push(ADAPTERS_LIB / "llama_prefix_tuning_safetensors", "prefix")
    reg.push(ADAPTERS_LIB / "minilm_double_seq_bn", "other/bn")
    reg.push(ADAPTERS_LIB / "llama_seq_bn_bin", "other/bin", allow_pickle=True)


def _expected(root: Path, *, pattern=None, kind=None, base=None, tag=None) -> set[tuple[str, str, str]]:
    """What a filter must return, computed from the ref files and manifests alone."""
    from fnmatch import fnmatchcase

    out = set()
    for (name, version), digest in disk_refs(root).items():
        m = json.loads(blob_path(root, digest).read_bytes())
        if pattern and not fnmatchcase(name, pattern):
            continue
        if kind and m["kind"] != kind:
            continue
        b = m["base"]
        if base and not (fnmatchcase(b["name_or_path"] or "", base) or (b["fingerprint"] or "").startswith(base)):
            continue
        if tag:
            ns, _, short = name.rpartition("/")
            name_dir = root / "refs" / (ns or "_") / short
            tag_file = name_dir / "tags" / tag
            if tag_file.is_file():
                if tag_file.read_text().strip() != version:
                    continue
            elif not (tag == "latest" and (name_dir / "newest").read_text().strip() == version):
                continue
        out.add((name, version, digest))
    return out


def _listed(reg: Registry, **kw) -> set[tuple[str, str, str]]:
    return {(i.name, i.version, i.digest) for i in reg.list(**kw)}


FILTERS = [{}, {"pattern": "team/*"}, {"pattern": "*/bn"}, {"pattern": "prefix"}, {"kind": "lora"},
           {"kind": "bottleneck"}, {"kind": "prefix"}, {"base": "sentence-transformers/*"}, {"base": "tiny*"},
           {"tag": "stable"}, {"tag": "latest"}, {"pattern": "team/*", "kind": "lora", "tag": "latest"},
           {"pattern": "nothing*"}]


def test_list_filters_agree_with_refs_and_survive_index_deletion(tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    _populate(reg)
    fp = reg.manifest("team/llama")["base"]["fingerprint"]
    filters = [*FILTERS, {"base": fp[:12]}]
    results = {}
    for kw in filters:
        results[json.dumps(kw)] = got = _listed(reg, **kw)
        assert got == _expected(root, **kw), kw
    assert len(results["{}"]) == 7
    assert {n for n, _, _ in results[json.dumps({"pattern": "team/*"})]} == {"team/sent", "team/bn", "team/llama"}
    assert results[json.dumps({"base": fp[:12]})] == {("team/llama", "1", reg.resolve("team/llama").digest)}
    infos = {i.ref: i for i in reg.list()}
    assert infos["team/sent@1"].tags == ("stable",) and infos["team/sent@2"].tags == ("latest",)

    reg.close()
    (root / "index.sqlite").unlink()
    fresh = Registry(root)
    for kw in filters:
        assert _listed(fresh, **kw) == results[json.dumps(kw)], kw
    assert [i.ref for i in fresh.list()] == [i.ref for i in reg.list()]
    assert fresh.verify().ok


def test_a_name_left_dirty_by_a_crash_is_reindexed_on_next_open(tmp_path, minilm_plus):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "team/x")
    reg.push(minilm_plus, "team/x")
    reg.push(LLAMA_LORA, "team/y")
    listed = _listed(reg)
    reg.close()
    # crash between "mark dirty + write ref" and "update index": the ref is there, the index is not
    crashed = Registry(root)
    digest = hand_made_version(crashed, "team/x", "2", "3")
    crashed.close()
    assert raw_index(root, "SELECT name FROM dirty") == [("team/x",)]
    assert raw_index(root, "SELECT version FROM versions WHERE name='team/x' ORDER BY version") == [("1",), ("2",)]
    fresh = Registry(root)
    assert _listed(fresh) == listed | {("team/x", "3", digest)}
    assert _listed(fresh, pattern="team/x") == _expected(root, pattern="team/x")
    assert raw_index(root, "SELECT name FROM dirty") == []
    assert fresh.verify().ok


def test_index_drift_without_a_dirty_mark_is_reported_by_verify(tmp_path, minilm_plus):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "x")
    reg.list()
    hand_made_version(reg, "x", "1", "2", mark_dirty=False)
    report = reg.verify()
    assert any(p.severity == "error" and p.what == "index" for p in report.problems)
    reg.reindex()
    assert reg.verify().ok and _listed(reg) == _expected(root)


def test_tag_untag_rm_do_not_hang_on_a_name_left_dirty(tmp_path):
    """A crash (or a failed push) leaves a name marked dirty; the next tag/untag/rm on that name takes
    the name's lock and then refreshes dirty names, which takes the same lock again."""
    procs = []
    for op, args in (("tag", ["x@1", "stable"]), ("untag", ["x", "old"]), ("rm", ["x@1"])):
        root = tmp_path / op
        reg = Registry(root)
        reg.push(MINILM_LORA, "x", tags=["old"])
        reg.push(LLAMA_LORA, "x")
        reg.close()
        crashed = Registry(root)
        crashed.index.mark_dirty("x")
        crashed.close()
        procs.append((op, root, subprocess.Popen([sys.executable, str(WORKER), "op", str(root), op, *args],
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    deadline = time.monotonic() + 10
    hung = []
    for op, _, p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            hung.append(op)
    assert not hung, f"{hung} hung on the name's own lock"
    for _op, root, p in procs:
        assert p.returncode == 0, p.stderr.read()
        assert Registry(root).verify().ok


# --- 7. kill -9 loop -----------------------------------------------------------------------------

KILLS = 30
NAMES = ["crash/a", "crash/b", "solo"]


def test_kill_minus_nine_loop_loses_nothing(tmp_path, big_adapter):
    root = tmp_path / "reg"
    workdir = tmp_path / "work"
    workdir.mkdir()
    rng = random.Random(20240607)
    done: dict[tuple[str, str], str] = {}
    kills = mid_push = 0
    stderr_path = tmp_path / "worker.err"
    k = 0
    # at least KILLS kills; on a loaded machine keep going (bounded) until enough pushes completed
    while k < KILLS or ((len(done) < 30 or mid_push < 10) and k < 4 * KILLS):
        k += 1
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen([sys.executable, str(WORKER), "push-loop", str(root), str(big_adapter),
                                     str(workdir), str(1000 + k), *NAMES], stdout=subprocess.PIPE, stderr=err,
                                    text=True)
            first = proc.stdout.readline()
            if first.strip() != "READY":
                proc.kill()
                proc.wait()
                pytest.fail(f"worker did not start: {first!r} {stderr_path.read_text()[-3000:]}")
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the worker died by itself: {stderr_path.read_text()[-3000:]}"
        kills += 1
        lines = rest.splitlines()
        for line in lines:
            if line.startswith("DONE "):
                ref, digest = line.split()[1:3]
                name, version = ref.split("@")
                assert (name, version) not in done, f"{ref} was handed out twice"
                done[(name, version)] = digest
        if lines and lines[-1].startswith("START "):
            mid_push += 1
    print(f"\nkill loop: {kills} kills, {mid_push} during a push, {len(done)} completed pushes")
    assert kills >= 20
    assert mid_push >= 10, f"only {mid_push} of {kills} kills landed during a push"
    assert len(done) >= 30

    reg = Registry(root)
    report = reg.verify()
    assert report.ok, [p for p in report.problems if p.severity == "error"]

    on_disk = disk_refs(root)
    assert set(done) <= set(on_disk), "a completed push is missing"
    for key, digest in done.items():
        assert on_disk[key] == digest
    for (name, version), digest in on_disk.items():  # nothing partial: every version complete
        check_version_on_disk(root, name, version, digest)
    for name in NAMES:
        versions = sorted(int(v) for n, v in on_disk if n == name)
        assert versions == list(range(1, len(versions) + 1)), f"{name}: versions {versions} have gaps"
    assert _listed(reg) == {(n, v, d) for (n, v), d in on_disk.items()}
    stale_latest = {name: reg.resolve(name).version for name in NAMES
                    if reg.resolve(name).version != str(max(int(v) for n, v in on_disk if n == name))}
    assert not stale_latest, f"latest does not name the newest complete push: {stale_latest}"

    for i, ((name, version), digest) in enumerate(sorted(done.items())):
        out = tmp_path / "pulls" / f"{i}"
        reg.pull(f"{name}@{version}", out, link=i % 4 != 0)
        manifest = json.loads(blob_path(root, digest).read_bytes())
        assert dir_hashes(out) == {f["path"]: "sha256:" + f["sha256"] for f in manifest["files"]}
        shutil.rmtree(out)

    staging = sum(1 for p in report.orphans if p.what == "staging")
    orphan_blobs = sum(1 for p in report.orphans if p.what == "blob")
    print(f"kill loop: left {staging} staging files and {orphan_blobs} orphan blobs (killed mid-write / pre-ref)")
    reg.gc()  # default grace: staging files of killed writers go at once, however fresh
    report = reg.verify()
    assert report.ok and report.orphans == [], report.problems
    assert disk_refs(root) == on_disk
    print(f"kill loop: {len(on_disk)} versions verified")


# --- 8. multi-process race -----------------------------------------------------------------------

RACERS = [("race/shared", 0), ("race/shared", 1), ("race/shared", 2), ("race/solo-3", 3), ("solo-4", 4)]
PUSHES = 25


def test_concurrent_pushes_lose_nothing_and_never_share_a_version(tmp_path):
    root = tmp_path / "reg"
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs = []
    for name, proc_id in RACERS:
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "race", str(root), str(LLAMA_LORA), str(go),
                                       str(proc_id), str(PUSHES), name],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    gc_proc = subprocess.Popen([sys.executable, str(WORKER), "gc-loop", str(root), str(go), str(stop)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for p in [*procs, gc_proc]:
            assert p.stdout.readline().strip() == "READY", p.stderr.read()
        go.touch()
        outputs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        stop.touch()
        for p in [*procs, gc_proc]:
            if p.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)
                p.kill()
    gc_out, gc_err = gc_proc.communicate(timeout=30)
    assert gc_proc.returncode == 0, gc_err[-3000:]

    reported: dict[tuple[str, str], tuple[str, str]] = {}
    pushes = set()
    for out in outputs:
        for line in out.splitlines():
            _, ref, digest, proc_id, i = line.split()
            name, version = ref.split("@")
            assert (name, version) not in reported, f"{ref} handed out twice"
            reported[(name, version)] = (digest, f"{proc_id}-{i}")
            pushes.add(f"{proc_id}-{i}")
    assert len(pushes) == len(reported) == len(RACERS) * PUSHES

    reg = Registry(root)
    on_disk = disk_refs(root)
    assert set(on_disk) == set(reported)
    for name in {n for n, _ in RACERS}:
        n_pushes = PUSHES * sum(1 for n, _ in RACERS if n == name)
        versions = sorted(int(v) for n, v in on_disk if n == name)
        assert versions == list(range(1, n_pushes + 1)), f"{name}: {versions}"
    for (name, version), (digest, push) in reported.items():
        assert on_disk[(name, version)] == digest
        manifest = check_version_on_disk(root, name, version, digest)
        assert manifest["description"] == push, "each version holds the push that reported it"
    report = reg.verify()
    assert report.ok, report.problems
    assert _listed(reg) == {(n, v, d) for (n, v), (d, _) in reported.items()}
    for name in {n for n, _ in RACERS}:
        assert len(reg.list(name)) == PUSHES * sum(1 for n, _ in RACERS if n == name)
    print(f"\nrace: {len(procs)} processes x {PUSHES} pushes, {len(reported)} versions verified, "
          f"gc runs alongside: {gc_out.split()[-1]}")


def test_concurrent_pushes_of_identical_content_make_one_version(tmp_path):
    root = tmp_path / "reg"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "race", str(root), str(LLAMA_LORA), str(go), str(i), "5",
                               "dup/x", "same"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    go.touch()
    refs = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        refs |= {tuple(line.split()[1:3]) for line in out.splitlines()}
    assert len(refs) == 1 and next(iter(refs))[0] == "dup/x@1", refs
    assert set(disk_refs(root)) == {("dup/x", "1")}
    assert Registry(root).verify().ok


# --- 9. permissions and a full disk --------------------------------------------------------------


@pytest.mark.parametrize("method", ["chmod", "immutable"])
def test_push_into_unwritable_blobs_is_a_clear_storage_error(method, tmp_path):
    if method == "chmod" and IS_ROOT:
        pytest.skip("root bypasses permission bits")
    if method == "immutable" and not IS_ROOT:
        pytest.skip("chattr +i needs root")
    root = tmp_path / "reg"
    reg = Registry(root)
    blobs = root / "blobs" / "sha256"
    with unwritable(blobs), pytest.raises(StorageError) as e:
        reg.push(MINILM_LORA, "x")
    msg = str(e.value)
    assert "permission" in msg.lower() and "fix:" in msg
    assert disk_refs(root) == {}
    assert list((root / "tmp").iterdir()) == [], "staging files were left behind"
    with pytest.raises(NotFoundError):
        reg.resolve("x")
    assert reg.list() == [] and reg.verify().ok
    assert reg.push(MINILM_LORA, "x").version == "1", "after the fix, the same push works"
    assert reg.verify().ok


def test_a_failed_push_keeps_the_registry_usable_in_the_same_process(tmp_path):
    """The refs directory refuses the new version: StorageError, no version 2, and the same process can
    still tag (run in a subprocess: with the dirty-name lock bug the tag hangs forever)."""
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "x")
    reg.close()
    versions = root / "refs" / "_" / "x" / "versions"
    with unwritable(versions):
        try:
            p = run_worker("failed-push-then-tag", str(root), str(LLAMA_LORA), "x", "x@1", "stable", timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("tag() hung after a failed push in the same process")
    assert p.stdout.split() == ["STORAGE_ERROR", "TAGGED"], p.stdout + p.stderr[-3000:]
    reg = Registry(root)
    assert set(disk_refs(root)) == {("x", "1")}
    assert reg.resolve("x@stable").version == "1" and reg.verify().ok


def test_full_disk_is_a_clear_storage_error_and_leaves_no_version(big_adapter, tiny_disk):
    root = tiny_disk / "reg"
    reg = Registry(root)
    small = reg.push(LLAMA_LORA, "x")
    with pytest.raises(StorageError) as e:
        reg.push(big_adapter, "x")
    assert "disk is full" in str(e.value) and "fix:" in str(e.value)
    assert set(disk_refs(root)) == {("x", "1")}
    assert list((root / "tmp").iterdir()) == [], "the partial blob was left in staging"
    assert reg.resolve("x").digest == small.digest
    report = reg.verify()
    assert report.ok, report.problems
    for orphan in report.orphans:  # files stored before the big one ran out of space: complete, unused
        assert orphan.what == "blob"
        path = Path(orphan.where)
        assert sha256_file(path) == f"sha256:{path.parent.name}{path.name}"
    reg.gc(temp_grace=0)
    assert reg.verify().orphans == []
    assert reg.push(LLAMA_LORA, "y").version == "1", "the registry still works"
    reg.close()


def test_a_full_disk_under_the_index_is_one_clear_message(tiny_disk, monkeypatch):
    """With the registry's disk full, sqlite's "disk I/O error" escaped as an internal error from list, tag, rm
    and verify (attack pass)."""
    from click.testing import CliRunner

    from adapterhub.cli import cli

    root = tiny_disk / "reg"
    reg = Registry(root)
    reg.push(LLAMA_LORA, "x")
    reg.close()  # its WAL files go: the next open must write them
    with open(tiny_disk / "filler", "wb") as f:  # fill the disk
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    for args in (["list"], ["tag", "x@1", "t"], ["rm", "x@1"], ["verify"]):
        r = CliRunner(env={"ADAPTERHUB_REGISTRY": str(root)}).invoke(cli, args)
        assert r.exit_code == 1 and "internal error" not in r.output, (args, r.output)
        assert r.output.startswith("error: ") and "\n  fix: " in r.output, (args, r.output)
    (tiny_disk / "filler").unlink()
    assert Registry(root).verify().ok


@pytest.mark.parametrize("damage", ["random-bytes", "bad-header", "dropped-table", "empty-file"])
def test_a_damaged_index_is_rebuilt_not_fatal(damage, tmp_path):
    """The index is derived data (FORMAT.md: it may be deleted at any time). A damaged file made every command,
    `reindex` included, an internal error (DatabaseError: file is not a database); a table dropped from it made
    `list` print nothing with exit 0."""
    import sqlite3

    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(LLAMA_LORA, "x")
    reg.push(MINILM_LORA, "y")
    reg.close()
    index = root / "index.sqlite"
    for extra in ("-wal", "-shm"):
        Path(f"{index}{extra}").unlink(missing_ok=True)
    if damage == "random-bytes":
        index.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    elif damage == "bad-header":
        index.write_bytes(b"SQLite format 3\0" + b"garbage" * 100)
    elif damage == "empty-file":
        index.write_bytes(b"")
    else:
        db = sqlite3.connect(index)
        db.execute("DROP TABLE versions")
        db.commit()
        db.close()
    reg = Registry(root)
    assert [i.ref for i in reg.list()] == ["x@1", "y@1"]
    assert reg.verify().ok
    reg.reindex()
    reg.close()


# --- 10. load ------------------------------------------------------------------------------------


def _assert_same_tensors(got, want) -> None:
    assert sorted(got.tensors) == sorted(want.tensors)
    for k in want.tensors:
        a, b = got.tensors[k], want.tensors[k]
        assert a.dtype == b.dtype and torch.equal(a, b), k


@pytest.mark.parametrize("name", ["minilm_seq_bn", "minilm_lora_all", "llama_prefix_tuning_safetensors",
                                  "minilm_double_seq_bn"])
def test_adapterhub_load_by_tag_returns_the_pushed_tensors(name, tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(ADAPTERS_LIB / name, "team/thing", tags=["prod"])
    reg.push(MINILM_LORA, "team/thing")
    want = read_adapter(ADAPTERS_LIB / name)
    got = adapterhub.load("team/thing@prod", registry=root)
    assert got.kind == want.kind and got.spec == want.spec
    _assert_same_tensors(got, want)
    assert got.base.name_or_path == want.base.name_or_path


def test_load_of_a_pushed_adapter_object_and_of_a_pickle(tmp_path, make_peft, llama_base):
    root = tmp_path / "reg"
    reg = Registry(root)
    src = make_peft(llama_base, LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]), seed=9)
    adapter = read_adapter(src)
    res = reg.push(adapter, "obj", tags=["t"])
    assert res.manifest["format"] == "adapterhub"
    _assert_same_tensors(adapterhub.load("obj@t", registry=root), adapter)

    with pytest.raises(PickleRefusedError):
        reg.push(ADAPTERS_LIB / "llama_seq_bn_bin", "pickled")
    assert disk_refs(root).keys() == {("obj", "1")}
    reg.push(ADAPTERS_LIB / "llama_seq_bn_bin", "pickled", allow_pickle=True, tags=["t"])
    with pytest.raises(PickleRefusedError):
        adapterhub.load("pickled@t", registry=root)
    got = adapterhub.load("pickled@t", registry=root, allow_pickle=True)
    _assert_same_tensors(got, read_adapter(ADAPTERS_LIB / "llama_seq_bn_bin", allow_pickle=True))


# --- 11. one damaged version never blocks the rest ------------------------------------------------


def _damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    else:
        corrupt_blob(path, offset=5)


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_one_damaged_manifest_never_blocks_the_rest(how, tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    good = reg.push(MINILM_LORA, "team/good", tags=["prod"])
    bad = reg.push(LLAMA_LORA, "team/bad")
    also = reg.push(ADAPTERS_LIB / "minilm_seq_bn", "team/bad")
    reg.close()
    _damage(blob_path(root, bad.digest), how)
    for f in root.glob("index.sqlite*"):
        f.unlink()  # FORMAT.md: the index may be deleted at any time

    fresh = Registry(root)
    assert _listed(fresh) == {("team/good", "1", good.digest), ("team/bad", "2", also.digest)}
    [damaged] = fresh.damaged()
    state = "missing" if how == "missing" else "corrupt (sha256 mismatch)"
    assert (damaged.ref, damaged.problem) == ("team/bad@1", f"its manifest blob {bad.digest[:19]}... is {state}")
    report = fresh.verify()
    assert not report.ok
    assert [(p.what, p.where) for p in report.problems if p.severity == "error"] == [("manifest", "team/bad@1")]
    assert "fix: `adapterhub rm team/bad@1` removes the damaged version" in report.problems[0].message
    fresh.reindex()
    assert [d.ref for d in fresh.damaged()] == ["team/bad@1"]
    assert fresh.resolve("team/bad").version == "2", "latest still names the newest readable version"
    assert fresh.push(ADAPTERS_LIB / "minilm_lora_all", "team/other").version == "1"
    assert fresh.push(ADAPTERS_LIB / "minilm_lora_all", "team/bad").version == "3"
    with pytest.raises(IntegrityError, match="fix: `adapterhub rm team/bad@1`"):
        fresh.pull("team/bad@1", tmp_path / "out")
    with pytest.raises(RegistryError, match="gc refuses to run"):
        fresh.gc()

    fresh.rm("team/bad@1")  # the printed fix
    assert fresh.damaged() == []
    report = fresh.verify()
    assert report.ok, report.problems
    assert {v.ref for v in fresh.list()} == {"team/good@1", "team/bad@2", "team/bad@3", "team/other@1"}
    assert fresh.resolve("team/good@prod").digest == good.digest
    fresh.gc()
    assert fresh.verify().orphans == []


def test_a_version_file_that_holds_no_digest_is_a_damaged_version_not_a_path(tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "a")
    versions = root / "refs" / "_" / "b" / "versions"
    versions.mkdir(parents=True)
    (versions / "1").write_text("../../../../etc/passwd\n")
    fresh = Registry(root)
    fresh.reindex()
    [damaged] = fresh.damaged()
    assert damaged.ref == "b@1"
    assert damaged.problem == "its version file holds '../../../../etc/passwd', not a manifest digest"
    with pytest.raises(IntegrityError, match="not a manifest digest"):
        fresh.show("b")
    assert not fresh.verify().ok
    fresh.rm("b@1")
    assert fresh.verify().ok and [v.ref for v in fresh.list()] == ["a@1"]


def test_a_corrupt_blob_is_repaired_by_the_printed_fix(tmp_path):
    """The message says "re-push the adapter": doing exactly that repairs the stored blob in place."""
    src = tmp_path / "src"
    shutil.copytree(LLAMA_LORA, src)
    root = tmp_path / "reg"
    reg = Registry(root)
    first = reg.push(src, "team/x")
    blob = file_blob(reg, "team/x", "adapter.safetensors")
    corrupt_blob(blob, offset=100)
    with pytest.raises(IntegrityError) as e:
        reg.pull("team/x", tmp_path / "bad")
    assert "fix: re-push the adapter" in str(e.value)

    again = Registry(root).push(src, "team/x")  # exactly the fix
    assert again.duplicate and not again.created and again.version == "1" and again.digest == first.digest
    assert again.repaired == ("adapter.safetensors",)
    assert blob.stat().st_mode & 0o777 == 0o444
    assert sha256_file(blob) == "sha256:" + blob.parent.name + blob.name
    fresh = Registry(root)
    assert fresh.verify().ok and fresh.verify().orphans == []
    assert dir_hashes(fresh.pull("team/x", tmp_path / "good")) == dir_hashes(src)
    _assert_same_tensors(fresh.load("team/x"), read_adapter(src))
    # a missing blob: the same fix stores it again
    blob.unlink()
    assert Registry(root).push(src, "other").created
    assert Registry(root).verify().ok


def test_push_trusts_a_blob_only_while_its_stat_stamp_is_unchanged(tmp_path, monkeypatch):
    from adapterhub.registry import store

    hashed: list[Path] = []
    real = store.hash_file

    def spy(path, progress=None):
        hashed.append(Path(path))
        return real(path, progress)

    monkeypatch.setattr(store, "hash_file", spy)
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "a")
    weights = file_blob(reg, "a", "adapter.safetensors")
    reg.push(MINILM_LORA, "b")
    assert hashed == [], "unchanged blobs hashed at push are trusted by their stamp"
    os.chmod(weights, 0o444)  # a chmod changes ctime: the stamp no longer matches
    reg.push(MINILM_LORA, "c")
    assert hashed == [weights], "a blob whose stamp changed is re-hashed"
    hashed.clear()
    reg.push(MINILM_LORA, "d")
    assert hashed == [], "re-hashed and intact: stamped again"
    reg.close()
    for f in root.glob("index.sqlite*"):
        f.unlink()
    Registry(root).push(MINILM_LORA, "e")
    assert sorted(hashed) == sorted(blob_path(root, "sha256:" + f["sha256"]) for f in reg.manifest("a")["files"]), \
        "no stamp (index deleted): every existing blob is re-hashed"


# --- 12. staging of killed pushes and gc's report --------------------------------------------------


def test_staging_of_a_killed_writer_is_removed_at_once_and_a_running_ones_never(tmp_path):
    root = tmp_path / "reg"
    Registry(root).push(MINILM_LORA, "a")
    proc = subprocess.Popen([sys.executable, str(WORKER), "hold-staging", str(root), "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["STAGING"], proc.stderr.read()
        staging = Path(line[1])
        assert staging.parent == root / "tmp" and staging.stat().st_size == 100000
        reg = Registry(root)
        assert not any(p.what == "staging" for p in reg.verify().orphans), "a running writer's file is no orphan"
        assert reg.gc(temp_grace=0).temp == [] and staging.exists(), "gc never removes a running writer's file"
        reg.push(LLAMA_LORA, "b")
        assert staging.exists(), "nor does a push"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reg = Registry(root)
    [orphan] = [p for p in reg.verify().orphans if p.what == "staging"]
    assert orphan.where == str(staging) and f"(pid {proc.pid})" in orphan.message
    assert reg.gc(dry_run=True).temp == [staging], "a dead writer's file is planned at once, whatever the grace"
    done = reg.gc()
    assert done.temp == [staging] and done.freed_size == 100000
    assert list((root / "tmp").iterdir()) == [] and list((root / "locks" / "staging").glob("*.lock")) == [
        p for p in (root / "locks" / "staging").glob("*.lock") if p.name.startswith(f"w{os.getpid()}-")]
    assert reg.verify().orphans == []


def test_a_push_killed_mid_write_leaves_staging_the_next_push_removes(tmp_path, big_adapter):
    """A real push killed with SIGKILL while its staging copy exists; the next push removes that copy."""
    root = tmp_path / "reg"
    Registry(root).push(LLAMA_LORA, "seed")
    workdir = tmp_path / "work"
    workdir.mkdir()
    left: list[Path] = []
    for attempt in range(20):
        proc = subprocess.Popen([sys.executable, str(WORKER), "push-loop", str(root), str(big_adapter), str(workdir),
                                 str(attempt), "victim"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        token = f"w{proc.pid}-"
        deadline = time.monotonic() + 10

        def writing(token: str = token) -> bool:  # a staging file with bytes in it (mkstemp makes it empty first)
            for n in os.listdir(root / "tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if n.startswith(token) and (root / "tmp" / n).stat().st_size > 0:
                        return True
            return False

        while time.monotonic() < deadline and not writing():
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = [p for p in (root / "tmp").iterdir() if p.name.startswith(token)]
        if left:
            break
    assert left, "no kill landed while a staging file existed"
    assert sum(p.stat().st_size for p in left) > 0
    Registry(root).push(MINILM_LORA, "next")
    assert not any(p.exists() for p in left), "the dead push's staging file was not removed"
    report = Registry(root).verify()
    assert report.ok and not any(p.what == "staging" for p in report.orphans)


def test_gc_reports_what_it_removed_not_what_it_planned(tmp_path, minilm_plus):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "keep")
    gone = reg.push(minilm_plus, "gone")
    readme = sha256_file(minilm_plus / "README.md")
    reg.rm("gone@1")
    plan = reg.gc(dry_run=True)
    assert set(plan.blobs) == {gone.digest, readme}
    # between plan and removal a push stores the same README again: its blob is referenced once more
    reg.push(minilm_plus, "again")
    done = plan.execute()
    assert done.blobs == [gone.digest] and done.kept == [readme]
    assert done.freed_size == len(canonical_json(gone.manifest))
    assert blob_path(root, readme).is_file() and not blob_path(root, gone.digest).exists()
    assert reg.verify().ok


# --- 13. what a push stores ------------------------------------------------------------------------


def _training_output(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(MINILM_LORA, d)
    (d / "README.md").write_text("# card\n")
    (d / "tokenizer.json").write_text("{}")
    (d / "chat_template.jinja").write_text("{{ messages }}")
    (d / "optimizer.pt").write_bytes(b"\x80\x04K\x01." * 100)
    (d / "training_args.bin").write_bytes(b"\x80\x04K\x02.")
    (d / "trainer_state.json").write_text("{}")
    (d / "checkpoint-10").mkdir()
    (d / "checkpoint-10" / "adapter.safetensors").write_bytes(b"x")
    (d / "checkpoint-10" / "rng_state.pth").write_bytes(b"x")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref\n")
    return d


def test_push_leaves_out_broken_links_instead_of_blaming_the_registry(tmp_path):
    """A README linking to a missing file, and a link loop, failed the push with "storing ... failed: No such file or
    directory / Too many levels of symbolic links. fix: check ... the registry directory" (attack pass)."""
    from adapterhub.registry.contents import LeftOut

    src = tmp_path / "a"
    shutil.copytree(MINILM_LORA, src)
    (src / "README.md").symlink_to(src / "CARD.md")  # inside the folder, but not there
    (src / "loop1").symlink_to(src / "loop2")
    (src / "loop2").symlink_to(src / "loop1")
    res = Registry(tmp_path / "reg").push(src, "x", include_all=True)
    assert [f["path"] for f in res.manifest["files"]] == ["adapter.safetensors", "adapter_config.json"]
    assert res.left_out == (LeftOut("README.md", "broken symbolic link"), LeftOut("loop1", "broken symbolic link"),
                            LeftOut("loop2", "broken symbolic link"))


def test_push_stores_only_the_adapter_and_lists_what_it_left_out(tmp_path):
    from adapterhub.registry.contents import LeftOut

    src = _training_output(tmp_path)
    reg = Registry(tmp_path / "reg")
    res = reg.push(src, "x")
    assert [f["path"] for f in res.manifest["files"]] == [
        "README.md", "adapter.safetensors", "adapter_config.json", "chat_template.jinja", "tokenizer.json"]
    assert res.left_out == (LeftOut(".git/", "hidden"), LeftOut("checkpoint-10/", "directory of 2 file(s)"),
                            LeftOut("optimizer.pt", "pickle"), LeftOut("trainer_state.json", "not an adapter file"),
                            LeftOut("training_args.bin", "pickle"))
    more = reg.push(src, "y", include=["trainer_state.json", "checkpoint-10/*.safetensors"])
    assert {f["path"] for f in more.manifest["files"]} - {f["path"] for f in res.manifest["files"]} == {
        "trainer_state.json", "checkpoint-10/adapter.safetensors"}
    everything = reg.push(src, "z", include_all=True)
    assert {f["path"] for f in everything.manifest["files"]} - {f["path"] for f in res.manifest["files"]} == {
        "trainer_state.json", "checkpoint-10/adapter.safetensors"}, "pickles and hidden files stay out"
    with pytest.raises(PickleRefusedError, match="optimizer.pt matches --include but is a pickle"):
        reg.push(src, "p", include=["*.pt"])
    pickled = reg.push(src, "p", include=["*.pt"], allow_pickle=True)
    assert "optimizer.pt" in {f["path"] for f in pickled.manifest["files"]}
    assert not (reg.root / "refs" / "_" / "p" / "versions" / "2").exists()


def test_push_and_readers_refuse_links_that_leave_the_folder(tmp_path):
    from adapterhub.errors import UnsafeLinkError

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "before")
    before = disk_refs(root)
    for link_name, target in (("README.md", secret), ("adapter_config.json", secret),
                              ("adapter.safetensors", MINILM_LORA / "adapter.safetensors")):
        d = tmp_path / f"evil-{link_name}"
        shutil.copytree(MINILM_LORA, d)
        (d / link_name).unlink(missing_ok=True)
        (d / link_name).symlink_to(target)
        with pytest.raises(UnsafeLinkError) as e:
            reg.push(d, "evil")
        assert e.value.path == d / link_name and e.value.target == target
        assert str(e.value).startswith(f"{d / link_name} is a symbolic link to {target}, outside the adapter "
                                       f"folder {d}; adapterhub does not follow links that leave the folder.\n"
                                       "  fix: ")
        if link_name != "README.md":
            with pytest.raises(UnsafeLinkError):
                read_adapter(d)
    assert disk_refs(root) == before
    inside = tmp_path / "inside"
    shutil.copytree(MINILM_LORA, inside)
    (inside / "README.md").symlink_to("adapter_config.json")  # a link within the folder is fine
    res = reg.push(inside, "ok")
    assert {f["path"]: f["sha256"] for f in res.manifest["files"]}["README.md"] == \
        sha256_file(inside / "adapter_config.json").removeprefix("sha256:")


def test_an_adapter_in_a_hugging_face_cache_snapshot_is_read_and_pushed(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>; links into the cache's own
    blobs are allowed, links elsewhere are not."""
    from adapterhub.errors import UnsafeLinkError

    cache = tmp_path / "models--x--lora"
    snap = cache / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "blobs").mkdir()
    for f in MINILM_LORA.iterdir():
        blob = cache / "blobs" / sha256_file(f).removeprefix("sha256:")
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    _assert_same_tensors(read_adapter(snap), read_adapter(MINILM_LORA))
    reg = Registry(tmp_path / "reg")
    assert dir_hashes(reg.pull(reg.push(snap, "hf").ref, tmp_path / "out", format=None)) == dir_hashes(MINILM_LORA)
    fake = tmp_path / "fake"
    (fake / "snapshots" / "r").mkdir(parents=True)
    (fake / "blobs").symlink_to(MINILM_LORA)  # a "blobs" that is a link is not a cache
    for f in MINILM_LORA.iterdir():
        (fake / "snapshots" / "r" / f.name).symlink_to(f"../../blobs/{f.name}")
    with pytest.raises(UnsafeLinkError):
        read_adapter(fake / "snapshots" / "r")


# --- 14. references: digest prefixes, tags -------------------------------------------------------


def test_unique_digest_prefixes_resolve_and_ambiguous_ones_are_refused(tmp_path):
    from adapterhub.errors import AmbiguousReferenceError

    root = tmp_path / "reg"
    reg = Registry(root)
    v1 = reg.push(MINILM_LORA, "x")
    v2 = reg.push(LLAMA_LORA, "x")
    for n in (8, 12, 64):
        assert reg.resolve(f"x@{v1.digest[:7 + n]}").version == "1"
        assert reg.resolve(f"x@{v2.digest[:7 + n]}").version == "2"
    with pytest.raises(InvalidReferenceError) as e:
        reg.resolve(f"x@{v1.digest[:14]}")
    assert str(e.value) == (f"invalid digest in 'x@{v1.digest[:14]}': expected sha256: and 8 to 64 lower-case hex "
                            "digits.\n  fix: copy it from `adapterhub list x --json` (a unique prefix of at least 8 "
                            "digits is enough).")
    with pytest.raises(NotFoundError):
        reg.resolve("x@sha256:00000000")
    # two versions whose digests share 8 digits (written by hand: finding real ones takes ~2^16 pushes)
    versions = root / "refs" / "_" / "y" / "versions"
    versions.mkdir(parents=True)
    (versions / "1").write_text("sha256:73f0f5ab" + "1" * 56 + "\n")
    (versions / "2").write_text("sha256:73f0f5ab" + "2" * 56 + "\n")
    with pytest.raises(AmbiguousReferenceError) as e:
        reg.resolve("y@sha256:73f0f5ab")
    assert e.value.candidates == ("y@1", "y@2")
    assert str(e.value) == ("'y@sha256:73f0f5ab' is ambiguous: 2 versions have a digest starting with "
                            "sha256:73f0f5ab: y@1 (sha256:73f0f5ab1111...), y@2 (sha256:73f0f5ab2222...).\n"
                            "  fix: give more hex digits of the digest, or the version.")
    assert reg.resolve("y@sha256:73f0f5ab2").version == "2"


@pytest.mark.parametrize("tag", ["01", "1.0", "1e3", "-1", "inf", "nan", "infinity", "1_000", "true", "false",
                                 "null", "0x1f"])
def test_tags_that_read_as_numbers_or_booleans_are_refused(tag, tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "a")
    before = tree(root)
    if tag == "0x1f":  # reads as a number to no tool we know of: allowed
        reg.tag("a@1", tag)
        assert reg.resolve(f"a@{tag}").version == "1"
        return
    for call in (lambda: reg.tag("a@1", tag), lambda: reg.push(LLAMA_LORA, "a", tags=[tag])):
        with pytest.raises(InvalidReferenceError):
            call()
    assert tree(root) == before
    if tag == "1.0":
        with pytest.raises(InvalidReferenceError) as e:
            reg.tag("a@1", tag)
        assert str(e.value) == ("tag '1.0' reads as a number; numbers are reserved for versions.\n"
                                "  fix: start the tag with a letter, e.g. 'v1.0'.")
    if tag == "true":
        with pytest.raises(InvalidReferenceError) as e:
            reg.tag("a@1", tag)
        assert str(e.value) == ("tag 'true' reads as a boolean to YAML and JSON tools.\n"
                                "  fix: choose another word, e.g. 'is-true'.")


# --- 15. identical content under another version --------------------------------------------------


def test_pushing_identical_content_again_makes_no_new_version_unless_asked(tmp_path, minilm_dir):
    root = tmp_path / "reg"
    reg = Registry(root)
    first = reg.push(MINILM_LORA, "x", tags=["prod"])
    reg.push(LLAMA_LORA, "x")
    refs = tree(root / "refs")
    for target in ("x", "x@7"):
        again = reg.push(MINILM_LORA, target, tags=["other"], description="same files")
        assert again.duplicate and not again.created
        assert (again.version, again.digest) == ("1", first.digest)
    assert tree(root / "refs") == refs, "nothing was pushed, no tag moved"
    assert reg.push(MINILM_LORA, "y").created, "another name is another adapter"
    assert reg.push(MINILM_LORA, "x", base=minilm_dir).version == "3", "a newly recorded base is new content"
    dup = reg.push(MINILM_LORA, "x", allow_duplicate=True)
    assert dup.created and not dup.duplicate and dup.version == "4"
    assert reg.verify().ok


# --- 16. pull's default format, show -------------------------------------------------------------


def test_pull_format_defaults_to_peft_where_peft_can_express_the_adapter(tmp_path, llama_base, make_peft):
    from peft import IA3Config, PrefixTuningConfig

    reg = Registry(tmp_path / "reg")
    sources = {"lora": LLAMA_LORA,
               "ia3": make_peft(llama_base, IA3Config(target_modules=["k_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]), seed=4),
               "prefix": make_peft(llama_base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), seed=5)}
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    for kind, src in sources.items():
        adapter = read_adapter(src)
        reg.push(adapter, f"blend-{kind}")  # an Adapter value is stored in adapterhub's own format, as blends are
        assert reg.manifest(f"blend-{kind}")["format"] == "adapterhub"
        auto = reg.pull_format(f"blend-{kind}", "auto")
        assert (auto.format, auto.stored) == ("peft", "adapterhub")
        assert auto.note == ("converted from the stored adapterhub format to PEFT (--format adapterhub writes the "
                             "stored files)")
        out = reg.pull(f"blend-{kind}", tmp_path / kind, format="auto")
        assert detect(out) == "peft"
        _assert_same_tensors(read_adapter(out), adapter)
        if kind != "lora":  # PEFT itself loads the pulled directory and computes what the source computes
            assert torch.equal(peft_outputs(llama_base, out, ids), peft_outputs(llama_base, src, ids))
    assert reg.pull_format("blend-lora", "adapterhub").format == "adapterhub"
    assert reg.pull_format("blend-lora", None).format == "adapterhub", "the Python default stays the stored format"
    # what a user pushed in PEFT's or the `adapters` library's format comes back as pushed
    reg.push(ADAPTERS_LIB / "minilm_seq_bn", "bn")
    reg.push(MINILM_LORA, "adapters-lora")
    reg.push(sources["ia3"], "peft-ia3")
    assert reg.pull_format("bn", "auto") == PullFormat("adapters", "adapters")
    assert reg.pull_format("adapters-lora", "auto") == PullFormat("adapters", "adapters")
    assert reg.pull_format("peft-ia3", "auto") == PullFormat("peft", "peft")
    # adapterhub's own format that PEFT cannot express stays as stored, saying why
    reg.push(read_adapter(ADAPTERS_LIB / "minilm_seq_bn"), "native-bn")
    reg.push(read_adapter(ADAPTERS_LIB / "llama_prefix_tuning_flat_safetensors"), "native-flat")
    bn = reg.pull_format("native-bn", "auto")
    assert (bn.format, bn.note) == ("adapterhub", "PEFT has no bottleneck adapters: written in the stored "
                                                  "adapterhub format; --format adapters writes it for the `adapters` "
                                                  "library")
    flat = reg.pull_format("native-flat", "auto")
    assert flat.format == "adapterhub"
    assert flat.note.startswith("this prefix is in the `adapters` library's 'adapters_flat' layout, which needs the "
                                "base model to convert")


def test_show_says_what_the_stored_adapter_is(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.push(MINILM_LORA, "lora")
    reg.push(ADAPTERS_LIB / "minilm_seq_bn", "bn")
    reg.push(ADAPTERS_LIB / "llama_prefix_tuning_safetensors", "prefix")
    lora = reg.show("lora")["adapter"]
    assert lora["lora"]["r"] == 8 and lora["lora"]["alpha"] == 16
    assert lora["targets"]["count"] == 12 and lora["targets"]["leaf_names"] == ["query", "value"]
    bn = reg.show("bn")["adapter"]["bottleneck"]
    assert bn["architecture"] == "seq_bn" and bn["reduction_factor"] > 0 and bn["locations"]
    prefix = reg.show("prefix")["adapter"]["prefix"]
    assert prefix["num_virtual_tokens"] == 10 and prefix["layout"] == "adapters_mlp"


# --- 17. read-only registries ----------------------------------------------------------------------


@contextlib.contextmanager
def read_only(path: Path):
    """Make a registry read-only for this process: a read-only bind mount as root, chmod -R a-w otherwise."""
    if IS_ROOT:
        if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode:
            pytest.skip("running as root and cannot bind-mount")
        try:
            if subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode:
                pytest.skip("cannot remount read-only")
            yield
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if not p.is_symlink()}
        for p in sorted(modes, key=lambda p: -len(p.parts)):
            os.chmod(p, modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in sorted(modes, key=lambda p: len(p.parts)):
                os.chmod(p, modes[p])


@pytest.mark.parametrize("index", ["current", "deleted", "stale"])
def test_a_read_only_registry_can_be_read_and_refuses_writes_clearly(index, tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.push(MINILM_LORA, "team/a", tags=["prod"])
    reg.push(LLAMA_LORA, "team/b")
    reg.push(ADAPTERS_LIB / "minilm_seq_bn", "bn")
    if index == "stale":
        hand_made_version(reg, "team/b", "1", "2")  # a version the index does not hold yet
    reg.close()
    if index == "deleted":
        for f in root.glob("index.sqlite*"):
            f.unlink()
    want = _expected(root)
    before = tree(root)
    with read_only(root):
        ro = Registry(root)
        assert not ro.writable
        assert _listed(ro) == want
        assert _listed(ro, kind="bottleneck") == _expected(root, kind="bottleneck")
        assert ro.show("team/a@prod")["adapter"]["lora"]["r"] == 8
        report = ro.verify()
        assert report.ok and report.versions == len(want), report.problems
        out = ro.pull("team/a", tmp_path / "pulled")
        assert dir_hashes(out) == dir_hashes(MINILM_LORA)
        ro.pull("team/b@1", tmp_path / "peft", format="peft")  # converted on the way out
        assert detect(tmp_path / "peft") == "peft"
        _assert_same_tensors(adapterhub.load("team/a", registry=root), read_adapter(MINILM_LORA))
        for what, call in (("push", lambda: ro.push(MINILM_LORA, "c")), ("tag", lambda: ro.tag("team/a@1", "t")),
                           ("untag", lambda: ro.untag("team/a", "prod")),
                           ("remove a version", lambda: ro.rm("team/a@1")), ("collect garbage", ro.gc),
                           ("rebuild the index", ro.reindex)):
            with pytest.raises(StorageError) as e:
                call()
            assert str(e.value) == (
                f"cannot {what}: the registry at {root} is read-only.\n  fix: use a registry you can write to "
                "(--registry PATH or $ADAPTERHUB_REGISTRY), or ask its owner to make it writable; reading (list, "
                "show, verify, pull) works as is.")
        assert ro.gc(dry_run=True).blobs == []
        if IS_ROOT:  # a read-only bind mount is another mount: a hard link cannot leave it (attack pass)
            with pytest.raises(StorageError) as e:
                ro.pull("team/a", tmp_path / "linked", link=True)
            assert "Invalid cross-device link" in str(e.value) and "pull without --link" in str(e.value)
            assert not (tmp_path / "linked").exists()
        assert tree(root) == before, "reading a read-only registry changed it"


@pytest.mark.parametrize("bad", [{"grace": float("nan")}, {"temp_grace": float("nan")}, {"grace": -1.0},
                                 {"grace": "3600"}, {"temp_grace": True}])
def test_gc_refuses_a_grace_that_is_no_number_of_seconds(tmp_path, bad):
    """`gc --grace nan` was taken (every age comparison false: gc silently kept everything)."""
    reg = Registry(tmp_path / "reg")
    reg.push(MINILM_LORA, "a")
    orphan = reg.store.put_bytes(b"nobody refers to me")
    with pytest.raises(RegistryError, match=r"must be a number of seconds, 0 or more.*\n  fix: pass e.g. --"):
        reg.gc(**bad)
    assert orphan in {i.digest for i in reg.store.list_blob_info()}
    assert reg.gc(grace=float("inf")).blobs == [] and reg.gc().blobs == [orphan]
