"""Every CLI command over a corpus of bad inputs (issue 10, item 6).

Corrupt and hostile files, hostile names and paths, and read-only places, run through the real
command group (click's CliRunner with ``catch_exceptions=False``: an exception escaping the error
policy fails the test with its traceback). Each case asserts:

- exit status 1 or 2 (a few read-only-registry reads must succeed: 0),
- no traceback and no "internal error" (an exception the policy did not expect),
- a short message (at most a few lines) that says what and how to fix it,
- no change anywhere outside the intended output: the registry, the read-only registry, every input
  and the working directory are byte- and mode-identical before and after.

Findings that belong to parts A (formats, checks, adapter) and B (registry, tensorfile, read_json)
of issue 10 are ``xfail(strict=True)`` with the owner in the reason, to be re-enabled as they land.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ADAPTERS_LIB

from adapterhub.cli import cli

COMMANDS = ("inspect", "check", "convert", "push", "pull", "list", "show", "tag", "untag", "rm", "gc", "verify",
            "reindex", "blend", "export")
MAX_CHARS = 1200  # a 5,000-character name or path is cut in messages, not echoed (twice) in full
MAX_LINES = 8  # a message is "a few lines": what, where, fix (a check report lists its problems first)


@dataclass
class World:
    root: Path
    cwd: Path
    reg: Path
    ro_reg: Path | None
    ro_dir: Path | None
    good: Path
    peft: Path
    base: Path
    bad: dict[str, Path]

    def out(self, name: str) -> Path:
        return self.root / "outputs" / name


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, str]]:
    out = _walk(root, skip)
    if any(k.endswith(("-wal", "-shm", "-journal")) for k in out):
        gc.collect()  # close registries that earlier in-process commands left open (their sqlite files go)
        out = _walk(root, skip)
    return out


def _walk(root: Path, skip: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for top, dirs, files in os.walk(root):
        if Path(top) == skip.parent:
            dirs[:] = [d for d in dirs if Path(top) / d != skip]
        for name in dirs + files:
            p = Path(top) / name
            st = p.lstat()
            body = ("-> " + os.readlink(p) if stat.S_ISLNK(st.st_mode) else
                    hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "")
            out[p.relative_to(root).as_posix()] = (st.st_mode, body)
    return out


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[bool]:
    """A directory tree that refuses writes even for root: a read-only bind mount (EROFS), else
    chattr -R +i (EPERM); chmod -R a-w as a user. Yields False if none is possible."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            os.chmod(p, modes[p] & ~0o222)
        try:
            yield True
        finally:
            for p, m in modes.items():
                os.chmod(p, m)
        return
    run = lambda *a: subprocess.run(list(a), capture_output=True).returncode == 0  # noqa: E731
    if run("mount", "--bind", str(path), str(path)):
        if run("mount", "-o", "remount,bind,ro", str(path)):
            try:
                yield True
            finally:
                subprocess.run(["umount", str(path)], check=True)
            return
        subprocess.run(["umount", str(path)], check=True)
    if shutil.which("chattr") and run("chattr", "-R", "+i", str(path)):
        try:
            yield True
        finally:
            subprocess.run(["chattr", "-R", "-i", str(path)], check=True)
        return
    yield False


def _invoke(args: list[object], registry: Path) -> tuple[int, str]:
    result = CliRunner(env={"ADAPTERHUB_REGISTRY": str(registry), "ADAPTERHUB_DEBUG": None}).invoke(
        cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _safetensors(path: Path, header: dict, data: bytes, declared: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("corpus")
    cwd = root / "work" / "sub"
    cwd.mkdir(parents=True)
    (root / "outputs").mkdir()
    inputs = root / "inputs"
    good = shutil.copytree(ADAPTERS_LIB / "llama_lora", inputs / "good")
    base = shutil.copytree(ADAPTERS_LIB / "tiny_llama_base", inputs / "base")
    reg = root / "reg"
    peft = inputs / "peft"
    assert _invoke(["convert", good, "-o", peft, "--format", "peft"], reg)[0] == 0
    for args in (["push", peft, "t/a", "--tag", "prod"], ["push", good, "t/b"], ["list"], ["verify"]):
        code, output = _invoke(args, reg)
        assert code == 0, output

    bad: dict[str, Path] = {}

    def variant(name: str, src: Path = peft) -> Path:
        bad[name] = shutil.copytree(src, inputs / name)
        return bad[name]

    weights = peft / "adapter_model.safetensors"
    d = variant("truncated")
    (d / weights.name).write_bytes(weights.read_bytes()[:-16])
    d = variant("lying-header")  # the header claims more data than the file holds
    tensors = load_file(weights)
    name, t = next(iter(tensors.items()))
    lie = {name: {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [0, 4096 * 4096 * 4]}}
    _safetensors(d / weights.name, lie, t.numpy().tobytes())
    d = variant("huge-header-length")
    _safetensors(d / weights.name, {}, b"", declared=1 << 60)
    d = variant("deep-config")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    d = variant("deep-header")
    deep = "[" * 100_000 + "]" * 100_000
    raw = ('{"__metadata__": {"x": "y"}, "a": ' + deep + "}").encode()
    (d / weights.name).write_bytes(struct.pack("<Q", len(raw)) + raw)
    config = json.loads((peft / "adapter_config.json").read_text())
    d = variant("nan-alpha")
    (d / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    d = variant("text-alpha-pattern")
    (d / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"q_proj": "abc"}}))
    d = variant("string-rank")
    (d / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    d = variant("not-json")
    (d / "adapter_config.json").write_text("{not json")
    d = variant("json-list")
    (d / "adapter_config.json").write_text("[1, 2]")
    d = variant("binary-config")
    (d / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
    d = variant("pickle-only")
    (d / weights.name).unlink()
    torch.save({k: v for k, v in tensors.items()}, d / "adapter_model.bin")
    d = variant("symlink-out")
    (d / "secret.txt").symlink_to("/etc/hostname")
    d = variant("symlink-readme")
    (d / "README.md").symlink_to("/etc/hostname")
    bad["empty"] = inputs / "empty"
    bad["empty"].mkdir()
    bad["missing"] = inputs / "missing"
    bad["file"] = inputs / "a-file"
    bad["file"].write_text("I am a file\n")
    d = bad["base-truncated"] = shutil.copytree(base, inputs / "base-truncated")
    (d / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:1000])
    d = bad["base-deep-config"] = shutil.copytree(base, inputs / "base-deep-config")
    (d / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    recipes = inputs / "recipes"
    recipes.mkdir()
    for rname, text in (("not-json", "{"), ("list", "[]"), ("wrong-schema", '{"recipe": "other"}'),
                        ("deep", "[" * 100_000 + "]" * 100_000),
                        ("missing-source", json.dumps({"recipe": "adapterhub.recipe.v1", "weights": [1],
                                                       "sources": [{"path": str(inputs / "missing")}]})),
                        ("bad-option", json.dumps({"recipe": "adapterhub.recipe.v1", "weights": [1], "method": "svd",
                                                   "sources": [{"path": str(peft)}], "options": {"rank": -3}})),
                        ("nan-weight", '{"recipe": "adapterhub.recipe.v1", "weights": [NaN], "method": "linear", '
                                       f'"sources": [{{"path": "{peft}"}}]}}'),
                        ("unknown-method", json.dumps({"recipe": "adapterhub.recipe.v1", "weights": [1],
                                                       "method": "average", "sources": [{"path": str(peft)}]}))):
        (recipes / f"{rname}.json").write_text(text)
        bad[f"recipe-{rname}"] = recipes / f"{rname}.json"

    gc.collect()  # close the setup's registries so no sqlite WAL file is copied
    ro_reg = shutil.copytree(reg, root / "ro-reg")
    ro_dir = root / "ro-dir"
    ro_dir.mkdir()
    with _read_only(ro_reg) as ok_reg, _read_only(ro_dir) as ok_dir:
        yield World(root, cwd, reg, ro_reg if ok_reg else None, ro_dir if ok_dir else None, good, peft, base, bad)


@dataclass(frozen=True)
class Case:
    args: Callable[[World], list[object]]
    codes: tuple[int, ...] = (1, 2)
    registry: str = "reg"  # or "ro-reg"
    xfail: str | None = None


def C(args: Callable[[World], list[object]], codes: tuple[int, ...] = (1, 2), *, ro: bool = False,
      xfail: str | None = None) -> Case:
    return Case(args, codes, "ro-reg" if ro else "reg", xfail)


A_NAN = None  # landed (h10-correct)
A_ALPHA = None  # landed (h10-correct)
B_DEEP = None  # landed
B_SYMLINK = None  # landed
B_RO = None  # landed
B_TAG = None  # landed

BAD_ADAPTERS = ("truncated", "lying-header", "huge-header-length", "not-json", "json-list", "binary-config",
                "pickle-only", "empty", "missing", "file", "string-rank")
XFAIL_ADAPTER = {"deep-config": B_DEEP, "deep-header": B_DEEP, "nan-alpha": A_NAN, "text-alpha-pattern": A_ALPHA}
HOSTILE_REFS = ("../../etc", "t/a\0b", "t/a\nb", "x" * 5000, "t/a@../../x", "t/a@", "@1", "t/a@sha256:zz",
                "T/A", "t/a@999", "nosuch/name", "t/a@sha256:" + "0" * 64)
#: messages owned by parts A/B that have no "fix:" line yet (pattern -> owner). Strict: once a matching
#: message has a fix line, its cases fail until the entry is removed here. (Empty since the attack pass gave the
#: name/reference, lookup and read_json messages their fix lines.)
NOFIX: dict[str, str] = {}
HOSTILE_OUTPUTS = {"proc": lambda w: "/proc/adapterhub-corpus", "dot": lambda w: ".", "dotdot": lambda w: "..",
                   "registry": lambda w: w.reg, "inside-registry": lambda w: w.reg / "blobs" / "x",
                   "nul": lambda w: "out\0x", "long": lambda w: "o" * 5000,
                   "file-parent": lambda w: w.bad["file"] / "x", "file": lambda w: w.bad["file"]}


def _cases() -> list:
    cases: dict[str, Case] = {}

    def add(cid: str, case: Case) -> None:
        assert cid not in cases, cid
        cases[cid] = case

    for name in BAD_ADAPTERS + tuple(XFAIL_ADAPTER):
        xf = XFAIL_ADAPTER.get(name)
        add(f"inspect-{name}", C(lambda w, n=name: ["inspect", w.bad[n]], xfail=xf))
        add(f"check-{name}", C(lambda w, n=name: ["check", w.bad[n], "--base", w.base], xfail=xf))
        add(f"convert-{name}", C(lambda w, n=name: ["convert", w.bad[n], "-o", w.out(f"convert-{n}")],
                                 xfail=xf if name != "nan-alpha" else A_NAN))
        add(f"push-{name}", C(lambda w, n=name: ["push", w.bad[n], "x/y"], xfail=xf))
        add(f"blend-{name}", C(lambda w, n=name: ["blend", w.bad[n], w.peft, "-o", w.out(f"blend-{n}")], xfail=xf))
        add(f"export-{name}", C(lambda w, n=name: ["export", w.bad[n], "--base", w.base, "-o", w.out(f"export-{n}")],
                                xfail=None if name == "nan-alpha" else xf))  # export refuses non-finite results
    for name in ("empty", "missing", "file", "base-truncated", "base-deep-config", "truncated"):
        xf = B_DEEP if "deep" in name else None
        add(f"check-base-{name}", C(lambda w, n=name: ["check", w.peft, "--base", w.bad[n]], xfail=xf))
        add(f"export-base-{name}", C(lambda w, n=name: ["export", w.peft, "--base", w.bad[n], "-o",
                                                        w.out(f"export-base-{n}")], xfail=xf))
        add(f"convert-base-{name}", C(lambda w, n=name: ["convert", w.peft, "--base", w.bad[n], "-o",
                                                         w.out(f"convert-base-{n}")], xfail=xf))
    add("check-other-architecture", C(lambda w: ["check", ADAPTERS_LIB / "minilm_lora", "--base", w.base]))
    # a link leaving the folder is refused when it would be stored (an allow-listed name, or --include-all)
    add("push-symlink-out", C(lambda w: ["push", w.bad["symlink-out"], "x/link", "--include-all"], xfail=B_SYMLINK))
    add("push-symlink-readme", C(lambda w: ["push", w.bad["symlink-readme"], "x/link"]))
    # hostile paths given as adapter paths
    for pid, path in (("dotdot-etc", "../../etc"), ("nul", "a\0b"), ("newline", "a\nb"), ("long", "a" * 5000),
                      ("proc", "/proc/self")):
        add(f"inspect-path-{pid}", C(lambda w, p=path: ["inspect", p]))
        add(f"push-path-{pid}", C(lambda w, p=path: ["push", p, "x/y"]))
    # hostile names and references
    for i, ref in enumerate(HOSTILE_REFS):
        add(f"show-ref{i}", C(lambda w, r=ref: ["show", r]))
        add(f"pull-ref{i}", C(lambda w, r=ref, i=i: ["pull", r, "-o", w.out(f"pull-ref{i}")]))
        add(f"rm-ref{i}", C(lambda w, r=ref: ["rm", r]))
        add(f"tag-ref{i}", C(lambda w, r=ref: ["tag", r, "newtag"]))
        if ref not in ("t/a@999", "nosuch/name"):  # valid push targets
            add(f"push-name{i}", C(lambda w, r=ref: ["push", w.peft, r]))
        add(f"blend-ref{i}", C(lambda w, r=ref, i=i: ["blend", r, "-o", w.out(f"blend-ref{i}")]))
        add(f"export-ref{i}", C(lambda w, r=ref, i=i: ["export", r, "--base", w.base, "-o", w.out(f"export-ref{i}")]))
    for i, tag in enumerate(("../x", "a b", "a\0b", "x" * 5000, "sha256:" + "0" * 64, "-", "")):
        add(f"tag-name{i}", C(lambda w, t=tag: ["tag", "t/a@1", t]))
        add(f"untag-name{i}", C(lambda w, t=tag: ["untag", "t/a", t]))
        add(f"push-tag{i}", C(lambda w, t=tag: ["push", w.peft, "x/y", "--tag", t]))
    for i, tag in enumerate(("01", "1.0", "1e3")):
        add(f"tag-number{i}", C(lambda w, t=tag: ["tag", "t/a@1", t], xfail=B_TAG))
    add("untag-missing", C(lambda w: ["untag", "t/a", "nosuchtag"]))
    add("rm-no-version", C(lambda w: ["rm", "t/a"]))
    add("list-bad-kind", C(lambda w: ["list", "--kind", "nosuchkind"]))
    add("list-registry-file", C(lambda w: ["--registry", w.bad["file"], "list"]))
    add("list-registry-not-a-registry", C(lambda w: ["--registry", w.root / "inputs", "list"]))
    add("list-registry-proc", C(lambda w: ["--registry", "/proc/adapterhub-reg", "list"]))
    add("verify-registry-file", C(lambda w: ["--registry", w.bad["file"], "verify"]))
    add("gc-registry-not-a-registry", C(lambda w: ["--registry", w.good, "gc"]))
    add("reindex-registry-not-a-registry", C(lambda w: ["--registry", w.good, "reindex"]))
    add("gc-bad-option", C(lambda w: ["gc", "--dry-run=maybe"]))
    # hostile outputs for every writing command
    for oid, out in HOSTILE_OUTPUTS.items():
        add(f"pull-out-{oid}", C(lambda w, o=out: ["pull", "t/a", "-o", o(w), "--force"]))
        add(f"convert-out-{oid}", C(lambda w, o=out: ["convert", w.peft, "-o", o(w), "--force"]))
        add(f"blend-out-{oid}", C(lambda w, o=out: ["blend", w.peft, w.good, "-o", o(w), "--force"]))
        add(f"export-out-{oid}", C(lambda w, o=out: ["export", w.peft, "--base", w.base, "-o", o(w), "--force"]))
        add(f"blend-save-recipe-{oid}", C(lambda w, o=out, oid=oid: ["blend", w.peft, "-o", w.out(f"bsr-{oid}"),
                                                                     "--save-recipe", o(w)]))
    for cmd, extra in (("convert", lambda w: [w.peft]), ("blend", lambda w: [w.peft, w.good]),
                       ("export", lambda w: [w.peft, "--base", w.base])):
        add(f"{cmd}-out-is-source", C(lambda w, c=cmd, e=extra: [c, *e(w), "-o", w.peft, "--force"]))
        add(f"{cmd}-out-inside-source", C(lambda w, c=cmd, e=extra: [c, *e(w), "-o", w.peft / "sub"]))
    add("export-out-inside-base", C(lambda w: ["export", w.peft, "--base", w.base, "-o", w.base / "merged"]))
    add("export-out-is-base", C(lambda w: ["export", w.peft, "--base", w.base, "-o", w.base, "--force"]))
    add("pull-out-contains-registry", C(lambda w: ["pull", "t/a", "-o", w.root, "--force"]))
    add("blend-save-recipe-over-source", C(lambda w: ["blend", w.peft, "-o", w.out("bso"), "--save-recipe",
                                                      w.peft / "adapter_config.json"]))
    add("blend-save-recipe-missing-folder", C(lambda w: ["blend", w.peft, "-o", w.out("bsm"), "--save-recipe",
                                                         w.root / "nope" / "r.json"]))
    add("pull-out-exists", C(lambda w: ["pull", "t/a", "-o", w.good]))
    # options
    add("blend-rank-linear", C(lambda w: ["blend", w.peft, "-o", w.out("b1"), "--rank", "4"]))
    add("blend-bad-method", C(lambda w: ["blend", w.peft, "-o", w.out("b2"), "--method", "average"]))
    add("blend-bad-weights", C(lambda w: ["blend", w.peft, "-o", w.out("b3"), "--weights", "a,b"]))
    add("blend-nan-weight", C(lambda w: ["blend", w.peft, "-o", w.out("b4"), "--weights", "nan"]))
    add("blend-weight-count", C(lambda w: ["blend", w.peft, w.good, "-o", w.out("b5"), "--weights", "1"]))
    add("blend-density-range", C(lambda w: ["blend", w.peft, w.good, "-o", w.out("b6"), "--method", "ties",
                                            "--density", "7"]))
    add("blend-no-target", C(lambda w: ["blend", w.peft]))
    add("blend-incompatible", C(lambda w: ["blend", w.peft, ADAPTERS_LIB / "llama_seq_bn", "-o", w.out("b7")]))
    add("export-rank-no-method", C(lambda w: ["export", w.peft, "--base", w.base, "-o", w.out("e1"), "--rank", "4"]))
    add("export-bad-dtype", C(lambda w: ["export", w.peft, "--base", w.base, "-o", w.out("e2"), "--dtype", "int3"]))
    add("export-bad-shard-size", C(lambda w: ["export", w.peft, "--base", w.base, "-o", w.out("e3"),
                                              "--max-shard-size", "lots"]))
    add("export-nan-weight", C(lambda w: ["export", f"{w.peft}=nan", "--base", w.base, "-o", w.out("e4")]))
    add("export-bottleneck", C(lambda w: ["export", ADAPTERS_LIB / "llama_seq_bn", "--base", w.base, "-o",
                                          w.out("e5")]))
    for rname in ("not-json", "list", "wrong-schema", "deep", "missing-source", "bad-option", "nan-weight",
                  "unknown-method"):
        add(f"blend-recipe-{rname}", C(lambda w, r=rname: ["blend", "--recipe", w.bad[f"recipe-{r}"], "-o",
                                                            w.out(f"br-{r}")]))
        add(f"export-recipe-{rname}", C(lambda w, r=rname: ["export", w.bad[f"recipe-{r}"], "--base", w.base, "-o",
                                                             w.out(f"er-{r}")]))
    # read-only places
    for cmd in ("pull", "convert", "blend", "export"):
        args = {"pull": lambda w: ["pull", "t/a"], "convert": lambda w: ["convert", w.peft],
                "blend": lambda w: ["blend", w.peft], "export": lambda w: ["export", w.peft, "--base", w.base]}[cmd]
        add(f"{cmd}-out-read-only", C(lambda w, a=args: [*a(w), "-o", "RO-DIR/out"]))
    add("blend-save-recipe-read-only", C(lambda w: ["blend", w.peft, "-o", w.out("bro"), "--save-recipe",
                                                    "RO-DIR/r.json"]))
    for cid, args in (("push", lambda w: ["push", w.good, "x/new"]), ("tag", lambda w: ["tag", "t/a@1", "new"]),
                      ("untag", lambda w: ["untag", "t/a", "prod"]), ("rm", lambda w: ["rm", "t/a@1"]),
                      ("gc", lambda w: ["gc"]), ("reindex", lambda w: ["reindex"]),
                      ("blend-push", lambda w: ["blend", w.peft, "--push", "x/blend"])):
        add(f"ro-registry-{cid}", C(args, ro=True))
    for cid, args in (("list", lambda w: ["list"]), ("show", lambda w: ["show", "t/a"]),
                      ("verify", lambda w: ["verify"]), ("gc-dry-run", lambda w: ["gc", "--dry-run"]),
                      ("pull", lambda w: ["pull", "t/a", "-o", w.out("ro-pull")])):
        add(f"ro-registry-read-{cid}", C(args, (0,), ro=True, xfail=B_RO if cid in ("list", "verify") else None))
    for cmd in ("", *COMMANDS):
        add(f"help-{cmd or 'adapterhub'}", C(lambda w, c=cmd: [c, "--help"] if c else ["--help"], (0,)))
    return [pytest.param(cid, case, id=cid, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)]
                         if case.xfail else []) for cid, case in cases.items()]


CASES = _cases()


def test_corpus_covers_every_command():
    ids = [p.id for p in CASES]
    assert len(ids) >= 250
    for cmd in COMMANDS:
        assert sum(i.startswith((f"{cmd}-", f"ro-registry-{cmd}", f"ro-registry-read-{cmd}")) for i in ids) >= 2, cmd


@pytest.mark.parametrize(("cid", "case"), CASES)
def test_bad_input(world: World, cid: str, case: Case, monkeypatch):
    monkeypatch.chdir(world.cwd)
    registry = world.reg if case.registry == "reg" else world.ro_reg
    args = case.args(world)
    if any(str(a).startswith("RO-DIR") for a in args):
        if world.ro_dir is None:
            pytest.skip("no way to make a read-only directory here")
        args = [str(a).replace("RO-DIR", str(world.ro_dir)) for a in args]
    if registry is None:
        pytest.skip("no way to make a read-only registry here")
    before = _snapshot(world.root, skip=world.root / "outputs" / "ro-pull")
    code, output = _invoke(args, registry)
    after = _snapshot(world.root, skip=world.root / "outputs" / "ro-pull")
    shown = f"adapterhub {' '.join(map(repr, map(str, args)))}\n{output}"
    assert "Traceback" not in output, shown
    assert "internal error" not in output, shown
    assert code in case.codes, shown
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], shown
    if case.codes == (0,):
        return
    lines = output.strip().splitlines()
    report = code == 1 and "INCOMPATIBLE" in lines[-1]  # a check's report: one line per problem, each with its fix
    assert len(output) <= MAX_CHARS or report, f"{len(output)} characters:\n{shown[:3000]}"
    assert 1 <= len(lines) <= MAX_LINES or report, shown
    if report:
        return
    click_usage = any(line.startswith("Error: ") for line in lines)  # click's own: usage, then "Error: ..."
    assert click_usage or any(line.startswith("error: ") for line in lines), shown
    if click_usage:
        return
    known = [owner for pattern, owner in NOFIX.items() if re.search(pattern, output)]
    if known:  # a message owned by part A/B that has no fix line yet
        assert "fix: " not in output, f"{shown}\n-> it has a fix line now: drop its NOFIX entry ({known[0]})"
    else:
        assert "fix: " in output, shown
