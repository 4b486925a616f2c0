"""The command line: output, --json, and exit codes (0 compatible, 1 incompatible, 2 unreadable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import ADAPTERS_LIB
from peft import LoraConfig

from adapterhub.cli import cli

LLAMA_BASE = ADAPTERS_LIB / "tiny_llama_base"


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_help_does_not_import_torch():
    code = "import sys; from adapterhub.cli import cli; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_inspect_text_and_json(llama_base, make_peft):
    src = make_peft(llama_base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"v_proj": 2}))
    result = run("inspect", src)
    assert result.exit_code == 0, result.output
    assert "kind        lora" in result.output
    assert "targets     4 modules (q_proj, v_proj)" in result.output
    assert "module ranks [2, 4]" in result.output and "scales [2.0, 4.0]" in result.output
    data = json.loads(run("inspect", src, "--json").output)
    assert data["format"] == "peft" and data["lora"]["ranks"] == [2, 4]
    assert data["num_parameters"] == 2 * (4 * 64 + 64 * 4) + 2 * (2 * 64 + 32 * 2)
    assert data["size_on_disk"] > data["tensor_bytes"]


def test_inspect_adapters_lib_bottleneck():
    result = run("inspect", ADAPTERS_LIB / "minilm_double_seq_bn")
    assert result.exit_code == 0, result.output
    assert "bottleneck  double_seq_bn, hidden 384, reduction 64, swish, 12 locations" in result.output


def test_check_exit_codes(llama_base, minilm_dir, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    ok = run("check", src, "--base", llama_base)
    assert ok.exit_code == 0 and "compatible (0 error(s)" in ok.output
    bad = run("check", src, "--base", minilm_dir)
    assert bad.exit_code == 1
    assert "error[target-missing] model.layers.0.self_attn.q_proj: no weight of this module" in bad.output
    data = json.loads(run("check", src, "--base", minilm_dir, "--json").output)
    assert data["compatible"] is False and {p["code"] for p in data["problems"] if p["severity"] == "error"} == {
        "base-architecture", "target-missing"}
    missing = run("check", tmp_path / "nope", "--base", llama_base)
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("check", empty, "--base", llama_base).exit_code == 2
    assert run("check", src, "--base", empty).exit_code == 2


def test_check_refuses_pickles_with_exit_2():
    result = run("check", ADAPTERS_LIB / "llama_seq_bn_bin", "--base", LLAMA_BASE)
    assert result.exit_code == 2 and "--allow-pickle" in result.output
    allowed = run("check", ADAPTERS_LIB / "llama_seq_bn_bin", "--base", LLAMA_BASE, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output


def test_convert_records_fingerprint_and_refuses_incompatible(llama_base, minilm_dir, make_peft, tmp_path):
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    out = tmp_path / "converted"
    result = run("convert", src, "-o", out, "--format", "adapterhub", "--base", llama_base)
    assert result.exit_code == 0, result.output
    assert json.loads(run("inspect", out, "--json").output)["base"]["fingerprint"].startswith("fp1:")
    refused = run("convert", src, "-o", tmp_path / "bad", "--base", minilm_dir)
    assert refused.exit_code == 1 and "target-missing" in refused.output
    assert not (tmp_path / "bad").exists()
    again = run("convert", src, "-o", out, "--format", "adapterhub")
    assert again.exit_code == 2 and "--force" in again.output


def test_damaged_input_gives_a_message_not_a_traceback(llama_base, make_peft, tmp_path):
    import shutil

    src = tmp_path / "damaged"
    shutil.copytree(make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"])), src)
    weights = src / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    for args in (("inspect", src), ("check", src, "--base", llama_base)):
        result = run(*args)
        assert result.exit_code == 2
        assert "error:" in result.output and "truncated" in result.output
        assert "Traceback" not in result.output
    lying = tmp_path / "lying-base"
    shutil.copytree(llama_base, lying)
    data = bytearray((lying / "model.safetensors").read_bytes())
    data[8:9] = b" "  # break the header's JSON
    (lying / "model.safetensors").write_bytes(bytes(data))
    result = run("check", ADAPTERS_LIB / "llama_lora", "--base", lying)
    assert result.exit_code == 2 and "model.safetensors" in result.output and "Traceback" not in result.output


# --- one error policy (issue 10, item 4) ----------------------------------------------------------


def test_every_exception_class_lives_in_errors_py():
    import importlib
    import inspect
    import pkgutil

    import adapterhub
    from adapterhub import errors

    elsewhere = []
    for info in pkgutil.walk_packages(adapterhub.__path__, "adapterhub."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name
                    and info.name != "adapterhub.errors"):
                elsewhere.append(f"{info.name}.{name}")
    assert elsewhere == [] and errors.__name__ == "adapterhub.errors"
    ours = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, BaseException)
            and c.__module__ == "adapterhub.errors"]
    assert len(ours) >= 20 and all(issubclass(c, errors.AdapterHubError) for c in ours)
    # the classes moved here stay importable where they used to live
    from adapterhub.compose.blend import BlendError
    from adapterhub.compose.merge import MergeError
    from adapterhub.export import ExportError
    from adapterhub.recipe import RecipeError
    assert {BlendError, MergeError, ExportError, RecipeError} <= set(ours)


def test_storage_error_is_an_io_error_not_a_registry_error():
    import errno

    from adapterhub.errors import AdapterHubError, RegistryError, StorageError, storage_error

    assert issubclass(StorageError, OSError) and issubclass(StorageError, AdapterHubError)
    assert not issubclass(StorageError, RegistryError)
    e = storage_error(OSError(errno.EROFS, "Read-only file system", "/x/y"), "writing /x/y", "/x")
    assert (e.errno, e.filename) == (errno.EROFS, "/x/y")
    assert str(e) == "writing /x/y failed: Read-only file system.\n  fix: /x is on a read-only file system; write " \
                     "somewhere else."


def test_render_error_maps_types_to_exit_codes_and_one_message():
    import errno

    import click as _click

    from adapterhub import errors
    from adapterhub.cli import render_error

    assert render_error(errors.MissingFileError("x does not exist.")) == (2, "error: x does not exist.")
    assert render_error(errors.OutputPathError("refused.")) == (2, "error: refused.")
    assert render_error(errors.BlendOptionError("bad option.")) == (2, "error: bad option.")
    assert render_error(errors.NotFoundError("no such version.")) == (1, "error: no such version.")
    assert render_error(errors.StorageError("disk full.")) == (1, "error: disk full.")
    assert render_error(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == (
        1, "error: Read-only file system: /ro/x.\n  fix: the file system is read-only; write somewhere else.")
    assert render_error(PermissionError(errno.EACCES, "Permission denied", "/p")) == (
        1, "error: Permission denied: /p.\n  fix: permission denied; check the permissions, or write somewhere else.")
    assert render_error(OSError(errno.ENOSPC, "No space left on device")) == (
        1, "error: No space left on device.\n  fix: the disk is full; free space and retry.")
    assert render_error(OSError(errno.EBUSY, "Device or resource busy", "..", None, "....old-1"))[1] == (
        "error: Device or resource busy: .. -> ....old-1.\n  fix: the path is in use (a mount point, or a folder a "
        "process works in); choose another.")
    assert render_error(IsADirectoryError(errno.EISDIR, "Is a directory", "/d"))[0] == 2
    assert render_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/n"))[0] == 2
    assert render_error(KeyboardInterrupt()) == (130, "interrupted (nothing half-written was kept).")
    assert render_error(RecursionError("maximum recursion depth exceeded")) == (
        1, "error: internal error (RecursionError: maximum recursion depth exceeded).\n  fix: this is a bug in "
           "adapterhub; rerun with ADAPTERHUB_DEBUG=1 for the traceback and report it.")
    assert not isinstance(_click.UsageError("x"), errors.AdapterHubError)


def test_a_failed_check_prints_each_problem_once(llama_base, minilm_dir, make_peft, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "reg"))
    src = make_peft(llama_base, LoraConfig(r=4, target_modules=["q_proj"]))
    line = "error[target-missing] model.layers.0.self_attn.q_proj: no weight of this module"
    for args in (("convert", src, "-o", tmp_path / "c", "--base", minilm_dir),
                 ("export", src, "--base", minilm_dir, "-o", tmp_path / "e"),
                 ("push", src, "x/y", "--base", minilm_dir)):
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert result.output.count(line) == 1, result.output
        assert result.output.count("INCOMPATIBLE") == 1 and result.output.strip().splitlines()[-1].startswith(
            f"error: {src} vs {minilm_dir}: INCOMPATIBLE (3 error(s)")  # + base-architecture
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()


def test_debug_variable_shows_the_traceback(tmp_path):
    env = {**os.environ, "ADAPTERHUB_DEBUG": "1"}
    cmd = [sys.executable, "-m", "adapterhub.cli", "inspect", str(tmp_path / "missing")]
    shown = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
    assert "adapterhub.errors.MissingFileError" in shown.stderr
    env.pop("ADAPTERHUB_DEBUG")
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert (plain.returncode, plain.stderr) == (2, f"error: {tmp_path / 'missing'} does not exist.\n  fix: check the "
                                                   "path (an adapter is a directory holding adapter_config.json).\n")


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """A real SIGINT while the command blocks reading its recipe (a FIFO nobody writes)."""
    import signal
    import time

    fifo = tmp_path / "recipe.json"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "blend", "--recipe", str(fifo), "-o",
                          str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it blocks opening the FIFO (Linux: wait_for_partner)
        wchan = Path(f"/proc/{p.pid}/wchan")
        if not wchan.exists() or "partner" in wchan.read_text() or "fifo" in wchan.read_text():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted (nothing half-written was kept)."
    assert not (tmp_path / "out").exists()


# --- the blend method table drives the CLI (issue 10, item 4) ----------------------------------------


def test_every_method_option_is_a_flag_of_blend_and_export():
    from adapterhub.compose.blend import METHODS, all_options

    assert list(all_options()) == ["rank", "density", "majority_sign_method", "seed"]
    for command in ("blend", "export"):
        text = run(command, "--help").output
        for name in all_options():
            assert f"--{name.replace('_', '-')}" in text, (command, name)
        assert "[linear|cat|svd|ties|dare_linear|dare_ties|magnitude_prune]" in text
    assert METHODS["ties"].option_names == ("rank", "density", "majority_sign_method")
    assert METHODS["dare_linear"].option_names == ("rank", "density", "seed")


def test_majority_sign_method_is_reachable_and_equals_the_library(tmp_path):
    from adapterhub.compose.blend import blend
    from adapterhub.formats import read_adapter

    a, b = ADAPTERS_LIB / "llama_lora", ADAPTERS_LIB / "llama_lora_all"
    r = run("blend", a, b, "--weights", "0.6,0.4", "--method", "ties", "--density", "0.4", "--rank", "4",
            "--majority-sign-method", "frequency", "-o", tmp_path / "out", "--save-recipe", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    recipe = json.loads((tmp_path / "r.json").read_text())
    assert recipe["options"] == {"density": 0.4, "majority_sign_method": "frequency", "rank": 4}
    want = blend([read_adapter(a), read_adapter(b)], [0.6, 0.4], "ties", rank=4, density=0.4,
                 majority_sign_method="frequency")
    got = read_adapter(tmp_path / "out")
    total = blend([read_adapter(a), read_adapter(b)], [0.6, 0.4], "ties", rank=4, density=0.4)
    for m in want.modules():
        names = want.module_tensors(m)
        for role in ("lora_A", "lora_B"):
            assert got.tensors[names[role]].equal(want.tensors[names[role]]), (m, role)
    assert any(not want.tensors[n].equal(total.tensors[n]) for n in want.tensors)  # the option changed the result


def test_method_options_are_refused_where_they_do_not_apply(tmp_path):
    a, b = ADAPTERS_LIB / "llama_lora", ADAPTERS_LIB / "llama_lora_all"
    r = run("export", a, "--base", LLAMA_BASE, "-o", tmp_path / "o", "--rank", "4")
    assert r.exit_code == 2 and r.output.endswith(
        "Error: --rank applies only to a blend: add --method (e.g. --method svd), or drop it (without --method "
        "every source is folded with its weight)\n")
    r = run("blend", a, b, "-o", tmp_path / "o", "--rank", "4")
    assert (r.exit_code, r.output) == (2, "error: blend method 'linear' takes no option(s) rank; it takes: none.\n"
                                          "  fix: drop them, or choose a method that takes them (svd, ties, "
                                          "dare_linear, dare_ties, magnitude_prune).\n")
    r = run("blend", a, b, "-o", tmp_path / "o", "--method", "ties", "--seed", "3")
    assert (r.exit_code, r.output) == (2, "error: blend method 'ties' takes no option(s) seed; it takes: rank, "
                                          "density, majority_sign_method.\n  fix: drop them, or choose a method "
                                          "that takes them (dare_linear, dare_ties).\n")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"recipe": "adapterhub.recipe.v1", "sources": [{"path": str(a)}], "weights": [1],
                                  "method": "svd", "options": {"rank": "16"}}))
    r = run("blend", "--recipe", recipe, "-o", tmp_path / "o")
    assert (r.exit_code, r.output) == (2, "error: option rank of blend method 'svd' must be an integer, not '16'.\n"
                                          "  fix: rank: target rank of every module, at least 1.\n")
    r = run("blend", "--recipe", recipe, "--method", "svd", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "--recipe fixes weights, method and options" in r.output
    assert not (tmp_path / "o").exists()


def test_export_takes_density_and_seed(tmp_path):
    from safetensors import safe_open

    a, b = ADAPTERS_LIB / "llama_lora", ADAPTERS_LIB / "llama_lora_all"
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        r = run("export", f"{a}=0.5", f"{b}=0.5", "--base", LLAMA_BASE, "-o", tmp_path / f"o{i}", "--method",
                "dare_linear", "--density", "0.5", "--seed", seed, "--rank", "8")
        assert r.exit_code == 0, r.output
        with safe_open(str(tmp_path / f"o{i}" / "model.safetensors"), "pt") as f:
            outs.append({k: f.get_tensor(k) for k in f.keys()})
            provenance = json.loads(f.metadata()["adapterhub.provenance"])
    assert provenance["method"] == "dare_linear" and provenance["options"] == {"density": 0.5, "rank": 8, "seed": 4}
    assert all(outs[0][k].equal(outs[1][k]) for k in outs[0])          # same seed, same checkpoint
    assert any(not outs[0][k].equal(outs[2][k]) for k in outs[0])      # the seed reaches the blend


def test_method_table_registration_is_checked():
    import pytest

    from adapterhub.compose.blend import RANK, method

    with pytest.raises(ValueError, match="registered twice"):
        method("svd", kinds=["lora"])(lambda adapters, weights: None)

    def wrong(adapters, weights, *, rank=8):
        return None

    with pytest.raises(ValueError, match="option 'rank' must be a keyword-only parameter of wrong with default None"):
        method("wrong-default", kinds=["lora"], options=(RANK,))(wrong)


def test_help_texts_are_complete():
    top = run("--help").output
    commands = top.split("Commands:\n")[1].split("\n\n")[0].splitlines()
    assert len(commands) == len(cli.commands) and not any(line.rstrip().endswith("...") for line in commands), commands
    for line in commands:
        name = line.split()[0]
        result = run(name, "--help")
        assert result.exit_code == 0 and "Usage: cli " + name in result.output
        assert "..." not in result.output.split("Options:")[0].replace("[ARGS]...", "").replace(
            "SOURCES]...", "").replace("SRC[=WEIGHT]...", "")
    assert "Exit status: 0 success; 1 the command failed" in top


def test_readme_documents_every_command_and_method_option():
    from adapterhub.compose.blend import METHODS, all_options

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in cli.commands:
        assert f"adapterhub {name} " in readme, name
    for name in all_options():
        assert f"--{name.replace('_', '-')}" in readme, name
    for name in METHODS:
        assert f"`{name}`" in readme, name


# --- attack pass: messages that echo what the user typed stay a few readable lines ---------------------------------


def test_a_5000_character_path_or_name_is_cut_in_the_message(tmp_path, monkeypatch):
    from adapterhub.cli import cut_long_words

    word = "/w/" + "o" * 5000
    assert cut_long_words(f"error: looking at {word} failed.\n  fix: check {word}.") == (
        f"error: looking at /w/{'o' * 97}...(5003 characters)...{'o' * 60} failed.\n"
        f"  fix: check /w/{'o' * 97}...(5004 characters)...{'o' * 59}.")
    assert cut_long_words("a" * 240 + " b") == "a" * 240 + " b"  # a long but ordinary path stays whole
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "reg"))
    monkeypatch.chdir(tmp_path)
    assert run("push", ADAPTERS_LIB / "llama_lora", "t/a").exit_code == 0
    # was 10,177 characters (the path twice, whole); click's own usage errors went through whole as well
    for args in (("pull", "t/a", "-o", "o" * 5000), ("inspect", "a" * 5000), ("push", "b" * 3000, "t/x")):
        result = run(*args)
        assert result.exit_code in (1, 2) and len(result.output) < 600, (args, len(result.output))
        assert "characters)..." in result.output and "Traceback" not in result.output, result.output


def test_name_and_lookup_messages_say_how_to_fix_them(tmp_path, monkeypatch):
    """Pinned verbatim: a hostile name is cut and a valid spelling suggested; a missing version names one that
    exists (these had no fix line)."""
    from adapterhub.errors import InvalidReferenceError, NotFoundError
    from adapterhub.registry import Registry
    from adapterhub.registry.refs import check_name, parse_ref

    msgs = []
    for bad in ("Team/My Adapter", "X" * 5000, "a/b/c", ""):
        try:
            check_name(bad)
        except InvalidReferenceError as e:
            msgs.append(str(e))
    assert msgs == [
        "invalid name part 'Team' in 'Team/My Adapter': use lower-case letters, digits, '.', '_' and '-', starting "
        "with a letter or digit, at most 64 characters, no '..'.\n  fix: write it as e.g. 'team'.",
        f"invalid name part '{'X' * 60}...(5000 characters)' in '{'X' * 60}...(5000 characters)': use lower-case "
        "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters, no '..'.\n"
        f"  fix: write it as e.g. '{'x' * 64}'.",
        "invalid name 'a/b/c': at most one '/' (namespace/name).\n  fix: join the rest with '-', e.g. "
        "team/project-sentiment.",
        "an adapter name cannot be empty.\n  fix: give a name such as team/sentiment."]
    try:
        parse_ref("t/a@1@2")
    except InvalidReferenceError as e:
        assert str(e) == "invalid reference 't/a@1@2': one '@' at most.\n  fix: write NAME@VERSION or NAME@TAG."
    reg = Registry(tmp_path / "reg")
    reg.push(ADAPTERS_LIB / "llama_lora", "t/a")
    reg.push(ADAPTERS_LIB / "llama_lora", "t/a", allow_duplicate=True)
    try:
        reg.resolve("t/a@7")
    except NotFoundError as e:
        assert str(e) == "'t/a' has no version or tag '7' (versions: 1, 2; tags: latest).\n  fix: use one of them, " \
                         "e.g. t/a@2."
    else:
        raise AssertionError("t/a@7 resolved")
    try:
        reg.rm("t/a")
    except InvalidReferenceError as e:
        assert str(e) == ("say which version of 't/a' to remove.\n  fix: `adapterhub rm t/a@VERSION` "
                          "(`adapterhub list t/a` shows them).")
    else:
        raise AssertionError("rm t/a went through")
