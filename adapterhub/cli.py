"""The ``adapterhub`` command line: parse, call one library function, render. No logic lives here.

Errors are rendered in one place (:func:`render_error`, table :data:`ERROR_MAPPINGS`) around the
whole group: every failure is a short message (what, where, ``fix:``) and an exit status, never a
Python traceback (``ADAPTERHUB_DEBUG=1`` shows it). Heavy modules (torch, safetensors) are
imported inside commands so ``adapterhub --help`` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from adapterhub import errors
from adapterhub.compose.blend import METHODS, all_options
from adapterhub.compose.vllm import VLLM_MAX_LORA_RANKS

EXIT_OK = 0
EXIT_FAILED = 1       # the command ran and failed or found a problem: incompatible, damaged, storage, refused
EXIT_USAGE = 2        # the command line or an input cannot be used: usage, unreadable file, bad reference, bad path
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_INCOMPATIBLE = EXIT_FAILED
EXIT_UNREADABLE = EXIT_USAGE

#: exception type -> exit status; the first match wins, so subclasses come before their bases.
#: OSErrors that adapterhub did not translate are mapped by errno (:data:`OS_ERRORS`).
ERROR_MAPPINGS: tuple[tuple[type[BaseException], int], ...] = (
    (errors.BlendOptionError, EXIT_USAGE),
    (errors.OutputPathError, EXIT_USAGE),
    (errors.FormatError, EXIT_USAGE),
    (errors.BaseCheckpointError, EXIT_USAGE),
    (errors.InvalidReferenceError, EXIT_USAGE),
    (errors.StorageError, EXIT_FAILED),
    (errors.AdapterHubError, EXIT_FAILED),
)

#: errno of an untranslated OSError -> (exit status, what to do)
OS_ERRORS: dict[int, tuple[int, str]] = {
    errno.ENOENT: (EXIT_USAGE, "check the path (its folder must exist, and the file system must allow new files)"),
    errno.ENOTDIR: (EXIT_USAGE, "a part of the path is a file, not a folder; check the path"),
    errno.EISDIR: (EXIT_USAGE, "that is a folder; give a file path"),
    errno.ENAMETOOLONG: (EXIT_USAGE, "use a shorter name"),
    errno.ELOOP: (EXIT_USAGE, "the path has a symlink loop; check it"),
    errno.EROFS: (EXIT_FAILED, "the file system is read-only; write somewhere else"),
    errno.EACCES: (EXIT_FAILED, "permission denied; check the permissions, or write somewhere else"),
    errno.EPERM: (EXIT_FAILED, "the operation is not permitted there (immutable file, or no rights); "
                               "write somewhere else"),
    errno.ENOSPC: (EXIT_FAILED, "the disk is full; free space and retry"),
    errno.EDQUOT: (EXIT_FAILED, "the disk quota is exceeded; free space and retry"),
    errno.EBUSY: (EXIT_FAILED, "the path is in use (a mount point, or a folder a process works in); choose another"),
    errno.EEXIST: (EXIT_FAILED, "something already exists there; choose another path"),
    errno.EXDEV: (EXIT_FAILED, "the paths are on different file systems; keep them on one"),
    errno.EIO: (EXIT_FAILED, "the disk reported an I/O error; check it"),
}


#: the longest word (a path, a name) an error message shows whole
LONG_WORD = 240


def _debug() -> bool:
    return os.environ.get("ADAPTERHUB_DEBUG", "") not in ("", "0")


def render_error(exc: BaseException) -> tuple[int, str]:
    """The exit status and the message (what, where, ``fix:``) for any exception that ends a command.

    A failed compatibility check prints its problems once each, then its summary.
    """
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, click.Abort)
                                              and isinstance(exc.__cause__, KeyboardInterrupt)):
        return EXIT_INTERRUPTED, "interrupted (nothing half-written was kept)."
    for kind, code in ERROR_MAPPINGS:
        if isinstance(exc, kind):
            report = getattr(exc, "report", None)
            if report is not None and getattr(report, "problems", None):
                lines = [p.line() for p in report.problems] + [f"error: {report.summary()}"]
                return code, "\n".join(lines)
            return code, f"error: {exc}"
    if isinstance(exc, OSError):
        code, fix = OS_ERRORS.get(exc.errno or 0, (EXIT_FAILED, "check the path and the file system"))
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return code, f"error: {exc.strerror or exc}{': ' + where if where else ''}.\n  fix: {fix}."
    if isinstance(exc, sqlite3.Error):  # the registry's search index (derived data) could not be used
        return EXIT_FAILED, (f"error: the registry's search index failed: {exc}.\n  fix: if the disk is full, free "
                             "space and retry; otherwise `adapterhub reindex` rebuilds the index from the manifests.")
    if isinstance(exc, ValueError) and "null byte" in str(exc):  # Python refuses NUL in any path it is given
        return EXIT_USAGE, "error: a path or name contains a NUL byte.\n  fix: remove it."
    if isinstance(exc, MemoryError):
        return EXIT_FAILED, ("error: out of memory.\n  fix: free memory, or work on fewer or smaller adapters "
                             "at once.")
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return EXIT_FAILED, (f"error: internal error ({type(exc).__name__}{': ' + detail if detail else ''}).\n"
                         "  fix: this is a bug in adapterhub; rerun with ADAPTERHUB_DEBUG=1 for the traceback and "
                         "report it.")


_LONG_WORD = re.compile(rf"\S{{{LONG_WORD + 1},}}")


def cut_long_words(message: str) -> str:
    """``message`` with every run of more than ``LONG_WORD`` non-blank characters (a 5,000-character path or
    name a user typed, echoed back) cut to its start and end, so an error stays a few readable lines."""
    return _LONG_WORD.sub(lambda m: f"{m[0][:100]}...({len(m[0])} characters)...{m[0][-60:]}", message)


class AdapterHubGroup(click.Group):
    """The command group, with the one catch around every command (see :func:`render_error`)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except click.ClickException as e:
            shown = io.StringIO()
            e.show(file=shown)
            click.echo(cut_long_words(shown.getvalue()), err=True, nl=False)
            sys.exit(e.exit_code)
        except BrokenPipeError:  # e.g. `adapterhub list | head -1`: stop quietly (Python's documented recipe)
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_FAILED)
        except BaseException as e:
            if _debug() and not isinstance(e, KeyboardInterrupt | click.Abort):
                raise
            code, message = render_error(e)
            if isinstance(e, click.Abort) and code != EXIT_INTERRUPTED:
                message = "Aborted!"
            click.echo(cut_long_words(message), err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing when piped."""
    if not sys.stderr.isatty() or total <= 0:
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


class _Bar:
    """A progress callable whose total is learnt later (``start(total)``, called by the library once it
    knows what it will move); draws on stderr when it is a terminal, nothing when piped."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def start(self, total: int) -> None:
        if self.bar is None and sys.stderr.isatty() and total > 0:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@contextmanager
def _bar(label: str) -> Iterator[_Bar]:
    bar = _Bar(label)
    try:
        yield bar
    finally:
        bar.close()


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _warn(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line, err=True)


allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True, envvar="ADAPTERHUB_ALLOW_PICKLE",
    help="Also read pickle .bin weights (with torch.load(weights_only=True)). Only for files you trust.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
FORMAT_CHOICE = click.Choice(["peft", "adapters", "adapterhub"])


def method_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per option of the blend method table (``--rank``, ``--density``, ...), with its type,
    help, default and the methods that take it; the command receives them as keyword arguments."""
    for name, (opt, takers) in reversed(list(all_options().items())):
        kind = click.Choice(list(opt.choices)) if opt.choices else opt.type
        f = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None,
                         help=f"{opt.help[0].upper()}{opt.help[1:]}; default {opt.default_text}. "
                              f"Methods: {', '.join(takers)}.")(f)
    return f


def _given_method_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The method options given on the command line (popped from a command's keyword arguments)."""
    return {name: value for name in all_options() if (value := kwargs.pop(name, None)) is not None}


def _method_help() -> str:
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


class _LazyRegistry:
    """Opens the registry on first use, so commands that need none never create one."""

    def __init__(self, path: str | None, endpoint_url: str | None = None, *, create: bool = True) -> None:
        self.path = path
        self.endpoint_url = endpoint_url
        self.create = create  # False: a command that only reads never makes a registry at a mistyped path
        self._registry = None

    def get(self):  # noqa: ANN201 - Registry, imported lazily
        if self._registry is None:
            from adapterhub.registry import Registry

            if self.path is not None and "://" in self.path:  # a remote registry: s3://, file://
                from adapterhub.registry.remotes import open_registry

                self._registry = open_registry(self.path, None, self.endpoint_url, create=self.create)
            else:
                self._registry = Registry(self.path, create=self.create or self.path is None)
        return self._registry


@click.group(cls=AdapterHubGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit status: 0 success; 1 the command failed or found a problem (incompatible, damaged, "
                    "read-only, disk full); 2 the command line or an input cannot be used (usage, unreadable "
                    "file, bad reference, refused output path); 130 interrupted. ADAPTERHUB_DEBUG=1 shows "
                    "tracebacks.")
@click.version_option(package_name="adapterhub")
@click.option("--registry", "registry_path", envvar="ADAPTERHUB_REGISTRY", type=click.Path(file_okay=False),
              help="Registry directory, or a remote registry's URL (s3://BUCKET/PREFIX, file:///DIR) "
                   "[env: ADAPTERHUB_REGISTRY; default: ~/.local/share/adapterhub/registry].")
@click.option("--endpoint-url", "endpoint_url", envvar="AWS_ENDPOINT_URL", metavar="URL",
              help="S3 endpoint of a non-AWS server (SeaweedFS, MinIO) for s3:// URLs [env: AWS_ENDPOINT_URL].")
@click.pass_context
def cli(ctx: click.Context, registry_path: str | None, endpoint_url: str | None) -> None:
    """Store, check, compose and ship adapters for shared base models."""
    ctx.obj = _LazyRegistry(registry_path, endpoint_url, create=ctx.invoked_subcommand not in READ_ONLY_COMMANDS)


#: commands that only read a registry (blend without --push too): on a --registry path that holds none they say so
READ_ONLY_COMMANDS = frozenset({"list", "show", "pull", "verify", "du", "gc", "reindex", "tag", "untag", "rm", "run",
                                "export", "blend"})


pass_registry = click.make_pass_decorator(_LazyRegistry)


@cli.command(short_help="Describe an adapter directory.")
@click.argument("adapter", type=click.Path(file_okay=False, path_type=str))
@allow_pickle_option
@json_option
def inspect(adapter: str, allow_pickle: bool, as_json: bool) -> None:
    """Describe the adapter directory ADAPTER: format, kind, base, targets, ranks, parameter count and
    size on disk."""
    from adapterhub.adapter import summarize
    from adapterhub.formats import detect, read_adapter

    fmt = detect(adapter)
    info = summarize(read_adapter(adapter, format=fmt, allow_pickle=allow_pickle), scan_values=True)
    info["format"] = fmt
    if as_json:
        _emit_json(info)
        return
    click.echo(_render_summary(info))


def _render_summary(info: dict[str, Any]) -> str:
    base = info["base"]
    base_s = base["name_or_path"] or "(not recorded)"
    if base["revision"]:
        base_s += f" @ {base['revision']}"
    if base["fingerprint"]:
        base_s += f"  fingerprint {base['fingerprint'][:20]}..."
    if base.get("model_type") or base.get("architectures"):
        base_s += f"  ({', '.join(base.get('architectures') or []) or base['model_type']})"
    kind = info["kind"]
    lines = [f"adapter     {info['source']}", f"format      {info['format']}", f"kind        {kind}",
             f"base        {base_s}", *_adapter_lines(info)]
    lines.append(f"parameters  {info['num_parameters']:,} in {info['num_tensors']} tensors "
                 f"({', '.join(info['dtypes'])})")
    if "size_on_disk" in info:
        lines.append(f"on disk     {_human(info['size_on_disk'])}")
    return "\n".join(lines)


def _adapter_lines(info: dict[str, Any]) -> list[str]:
    """The kind-specific lines of an adapter summary: targets, ranks, IA3, bottleneck, prefix."""
    lines = []
    if "targets" in info:
        t = info["targets"]
        lines.append(f"targets     {t['count']} modules ({', '.join(t['leaf_names'])})")
    if "lora" in info:
        lo = info["lora"]
        flags = [f for f, on in (("rsLoRA", lo["use_rslora"]), ("DoRA", lo["use_dora"]),
                                 ("fan_in_fan_out", lo["fan_in_fan_out"])) if on]
        lines.append(f"ranks       r={lo['r']} alpha={lo['alpha']}; module ranks {lo['ranks']}; "
                     f"scales {[round(s, 6) for s in lo['scales']]}" + (f"; {', '.join(flags)}" if flags else ""))
        if lo["rank_pattern"] or lo["alpha_pattern"]:
            lines.append(f"patterns    rank {lo['rank_pattern']} alpha {lo['alpha_pattern']}")
    if "ia3" in info:
        ff = info["ia3"]["feedforward_modules"]
        leaves = sorted({m.rsplit(".", 1)[-1] for m in ff})
        lines.append(f"feedforward {len(ff)} module(s) scale their input" + (f" ({', '.join(leaves)})" if ff else ""))
    if "bottleneck" in info:
        b = info["bottleneck"]
        lines.append(f"bottleneck  {b['architecture']}, hidden {b['hidden_size']}, reduction {b['reduction_factor']}, "
                     f"{b['non_linearity']}, {len(b['locations'])} locations")
    if "prefix" in info:
        p = info["prefix"]
        lines.append(f"prefix      {p['num_virtual_tokens']} virtual tokens x {p['width']} values ({p['layout']}; "
                     f"layers {p['num_layers']}, kv-heads {p['num_kv_heads']}, head_dim {p['head_dim']})")
    if info.get("carried"):
        lines.append(f"carried     {', '.join(info['carried'])}")
    if info.get("ignored"):
        ign = info["ignored"]
        lines.append(f"not applied {len(ign)} tensor(s) ({', '.join(sorted(ign)[:2])}{', ...' if len(ign) > 2 else ''})"
                     f": {sorted(set(ign.values()))[0]}")
    if info.get("non_finite"):
        from adapterhub.finite import describe

        bad = info["non_finite"]
        lines.append(f"NaN/Inf     {sum(bad.values())} value(s) in {len(bad)} tensor(s): {describe(bad)} -- this "
                     "adapter is broken; check, blend, export and push refuse it")
    if info.get("extract"):
        lines += _render_extract(info["extract"])
    return lines


def _render_extract(ex: dict[str, Any]) -> list[str]:
    """The extraction lines of `inspect`: lineage, then every module's rank, error and change."""
    tuned, base = ex.get("tuned") or {}, ex.get("base") or {}
    lines = [f"extracted   from {tuned.get('path')} ({(tuned.get('fingerprint') or '')[:20]}...) against "
             f"{base.get('path')}"]
    if ex.get("max_error") is not None:
        lines.append(f"error       max {ex['max_error']:.4g}, mean {ex['mean_error']:.4g} over {len(ex['modules'])} "
                     "modules (relative Frobenius error of tuned - base)")
    for m, v in sorted(ex["modules"].items()):
        change = v.get("change")
        lines.append(f"  {v.get('error', float('nan')):.4g}  rank {v.get('rank')}  "
                     f"change {'-' if change is None else f'{change:.2%}'}  {m}")
    for name, why in sorted((ex.get("not_extracted") or {}).items()):
        lines.append(f"not extracted {name}: {why}")
    return lines


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cli.command(short_help="Check that an adapter fits a base model (or vLLM).")
@click.argument("adapter", type=click.Path(file_okay=False, path_type=str))
@click.option("--base", "base_dir", type=click.Path(file_okay=False, path_type=str),
              help="Base model directory (config.json + safetensors). Required unless --for is given.")
@click.option("--for", "target", type=click.Choice(["vllm"]),
              help="Also check what this server would refuse (vLLM: its LoRA loader's rules).")
@click.option("--max-lora-rank", type=click.Choice([str(n) for n in VLLM_MAX_LORA_RANKS]), default=None,
              help="With --for vllm: the --max-lora-rank vLLM is started with (default 16).")
@click.option("--strict-identity", is_flag=True, help="A different recorded base name is an error, not a warning.")
@allow_pickle_option
@json_option
def check(adapter: str, base_dir: str | None, target: str | None, max_lora_rank: str | None, strict_identity: bool,
          allow_pickle: bool, as_json: bool) -> None:
    """Check that ADAPTER applies to the base model at --base, and/or that vLLM would load it (--for vllm).

    Exit status: 0 compatible, 1 incompatible, 2 unreadable input.
    """
    from adapterhub.compose.vllm import check_directory

    if base_dir is None and target is None:
        raise click.UsageError("give --base BASE_DIR, --for vllm, or both.")
    if max_lora_rank is not None and target != "vllm":
        raise click.UsageError("--max-lora-rank goes with --for vllm.")
    reports = check_directory(adapter, base=base_dir, target=target, strict_identity=strict_identity,
                              max_lora_rank=int(max_lora_rank or 16), allow_pickle=allow_pickle)
    if as_json:
        _emit_json(reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports])
    else:
        for report in reports:
            for p in report.problems:
                click.echo(p.line())
            click.echo(report.summary())
    sys.exit(EXIT_OK if all(r.ok for r in reports) else EXIT_INCOMPATIBLE)


@cli.command(short_help="Write an adapter in another format.")
@click.argument("adapter", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Directory to write.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="peft",
              show_default=True, help="Format to write.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False, path_type=str),
              help="Base model: checked first, its fingerprint recorded, and its config used where a format needs "
                   "model details (prefix layout, `adapters` model class).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@allow_pickle_option
def convert(adapter: str, output: str, fmt: str, base_dir: str | None, force: bool, allow_pickle: bool) -> None:
    """Read ADAPTER in any format and write it to OUTPUT in --format (checked against --base first
    when given)."""
    from adapterhub.convert import convert_adapter

    path, report = convert_adapter(adapter, output, format=fmt, base=base_dir, overwrite=force,
                                   allow_pickle=allow_pickle)
    _warn(p.line() for p in (report.problems if report else ()))
    click.echo(f"wrote {fmt} adapter to {path}")


# --- registry ------------------------------------------------------------------------------------


@cli.command(short_help="Store an adapter directory, or copy a version to a remote.")
@click.argument("directory", metavar="DIR|REF")
@click.argument("target", metavar="[NAME[@VERSION]]", required=False)
@click.option("--to", "to", metavar="REMOTE",
              help="Publish to this remote (a name from `adapterhub remote list`, a URL or a registry path) instead "
                   "of the local registry; with REF alone, copy that version there keeping its number.")
@click.option("--renumber", is_flag=True,
              help="With REF --to: if the remote holds that number with other content, publish under its next "
                   "free number instead of failing.")
@click.option("--endpoint-url", "endpoint_url", metavar="URL", help="S3 endpoint for an s3:// URL given to --to.")
@click.option("--tag", "tags", multiple=True, help="Tag to point at the new version (repeatable).")
@click.option("--description", default="", help="Free text stored in the manifest.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False, path_type=str),
              help="Check compatibility with this base first (refuse if incompatible) and record its fingerprint.")
@click.option("--metric", "metrics", multiple=True, metavar="KEY=VALUE", help="A metric to record (repeatable).")
@click.option("--include", "include", multiple=True, metavar="GLOB",
              help="Also store files matching GLOB, a path relative to DIRECTORY (repeatable).")
@click.option("--include-all", is_flag=True, help="Store every file of DIRECTORY except hidden ones and pickles.")
@click.option("--allow-duplicate", is_flag=True,
              help="Make a new version even when one of NAME already holds identical content.")
@allow_pickle_option
@pass_registry
def push(reg: _LazyRegistry, directory: str, target: str | None, to: str | None, renumber: bool,
         endpoint_url: str | None, tags: tuple[str, ...], description: str,
         base_dir: str | None, metrics: tuple[str, ...], include: tuple[str, ...], include_all: bool,
         allow_duplicate: bool, allow_pickle: bool) -> None:
    """Store the adapter in DIR as NAME[@VERSION]; prints NAME@VERSION sha256:DIGEST last.

    Stores what an adapter directory is (adapter configs, the weights, README, tokenizer files,
    generation/chat templates) and lists what it left out; --include GLOB or --include-all store more.
    Pickles (*.bin, *.pt, *.pth, *.pkl, *.ckpt) are stored only with --allow-pickle.

    With --to REMOTE, DIR NAME is published straight to the remote (numbered there as a local push
    is), and REF alone copies an existing version there, keeping its number and digest. An hf://ORG/REPO
    remote gets one commit holding the PEFT adapter, the manifest and a model card, and a tag vVERSION.
    """
    endpoint_url = endpoint_url or reg.endpoint_url
    if target is None:
        if to is None:
            raise click.UsageError("give DIR NAME[@VERSION], or REF --to REMOTE")
        _copy_to(reg, directory, to, endpoint_url, renumber)
        return
    if not Path(directory).is_dir():
        raise click.BadParameter(f"{directory!r} is not a directory", param_hint="DIR")
    parsed = {}
    for m in metrics:
        key, sep, value = m.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{m!r} is not KEY=VALUE", param_hint="--metric")
        parsed[key] = _number(value)
    from adapterhub.registry.refs import check_tag, check_target

    check_target(target)  # refuse bad names before the registry is even created
    for t in tags:
        check_tag(t)
    registry = reg.get()
    if to is not None:
        from adapterhub.registry.remotes import open_registry

        registry = open_registry(to, registry, endpoint_url)
    total = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    with _progress(total, "pushing") as progress:
        result = registry.push(directory, target, tags=tags, description=description, metrics=parsed,
                               base=base_dir, allow_pickle=allow_pickle, include=include, include_all=include_all,
                               allow_duplicate=allow_duplicate, progress=progress)
    if result.left_out:
        shown = ", ".join(x.path + ("" if x.reason == "not an adapter file" else f" ({x.reason})")
                          for x in result.left_out[:20])
        more = f", and {len(result.left_out) - 20} more" if len(result.left_out) > 20 else ""
        click.echo(f"left out (not part of an adapter; --include GLOB or --include-all stores them, pickles also "
                   f"need --allow-pickle): {shown}{more}", err=True)
    if result.repaired:
        click.echo(f"repaired the damaged stored copy of: {', '.join(result.repaired)}", err=True)
    if result.duplicate:
        click.echo(f"{result.ref} already holds identical content; nothing pushed "
                   "(use --allow-duplicate to make a new version)")
        if tags:
            click.echo(f"tags not applied: {', '.join(tags)} (`adapterhub tag {result.ref} TAG` moves one)", err=True)
    elif not result.created:
        click.echo(f"{result.ref} already exists with identical content; nothing pushed.")
    click.echo(f"{result.ref} {result.digest}")


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


@cli.command(short_help="Write version REF to a directory, verifying every hash.")
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Directory to write (optional with --from or hf://: the version is then only imported).")
@click.option("--from", "from_", metavar="REMOTE",
              help="Copy REF from this remote (name, URL or registry path) into the local registry first, keeping "
                   "its number and digest; every byte is hashed on arrival.")
@click.option("--renumber", is_flag=True,
              help="With --from: if the local registry holds that number with other content, import under the "
                   "next free number instead of failing.")
@click.option("--name", "import_name", metavar="NAME",
              help="For hf://ORG/REPO[@REVISION]: the local name to import under (default: ORG/REPO, lower-cased).")
@click.option("--endpoint-url", "endpoint_url", metavar="URL", help="S3 endpoint for an s3:// URL given to --from.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default=None,
              help="Write in this format. Default: the format it was pushed in; adapterhub's own format (blends) "
                   "as PEFT where PEFT can express it (LoRA, IA3, prefix tuning).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
@click.option("--link", is_flag=True,
              help="Hard-link files from the registry (instant; never edit them).")
@click.option("--verify", "rehash", is_flag=True,
              help="Re-hash every file, even those whose stat stamp is unchanged since they were last hashed.")
@pass_registry
def pull(reg: _LazyRegistry, ref: str, output: str | None, from_: str | None, renumber: bool,
         import_name: str | None, endpoint_url: str | None, fmt: str | None, force: bool, link: bool,
         rehash: bool) -> None:
    """Write version REF to a directory, verifying every hash.

    A stored file whose stat stamp (inode, size, mtime, ctime) is unchanged since it was last hashed
    is trusted without being read again; any other is hashed as it is copied. --verify re-hashes all.

    Without --format, a version comes back in the format it was pushed in; one stored in adapterhub's
    own format (a blend) is written as a PEFT directory where PEFT can express it, and the command
    says so.

    With --from REMOTE, the version is first copied into the local registry (same number and digest).
    REF may be hf://ORG/REPO[@REVISION]: any PEFT adapter repo on the Hub is imported into the local
    registry, its repo and commit recorded as its source (HF_HUB_OFFLINE=1 reads the local HF cache).
    """
    if ref.startswith("hf://") or from_ is not None:
        reg.create = True  # an import makes the local registry if it is not there yet
    registry = reg.get()
    endpoint_url = endpoint_url or reg.endpoint_url
    if ref.startswith("hf://") or from_ is not None:
        ref = _import_version(registry, ref, from_, endpoint_url, renumber, import_name)
        if output is None:
            return
    elif output is None:
        raise click.UsageError("give -o DIR (or --from REMOTE to import a version from a remote)")
    chosen = registry.pull_format(ref, fmt or "auto")
    size = int(registry.manifest(ref).get("size") or 0)
    with _progress(size, "pulling") as progress:
        path = registry.pull(ref, output, format=chosen.format, overwrite=force, link=link, verify=rehash,
                             progress=progress)
    resolved = registry.resolve(ref)
    if chosen.note:
        click.echo(f"note: {chosen.note}", err=True)
    click.echo(f"{resolved.ref} {resolved.digest} -> {path}")


@cli.command(name="list", short_help="List versions, filtered by name glob, kind, base or tag.")
@click.argument("pattern", required=False)
@click.option("--kind", type=click.Choice(["lora", "ia3", "bottleneck", "prefix"]), help="Only adapters of this kind.")
@click.option("--base", help="Only adapters for this base: a name glob or a fingerprint prefix.")
@click.option("--tag", help="Only versions carrying this tag.")
@json_option
@pass_registry
def list_(reg: _LazyRegistry, pattern: str | None, kind: str | None, base: str | None, tag: str | None,
          as_json: bool) -> None:
    """List versions, optionally filtered by a name glob such as 'team/*'.

    A damaged version (its manifest missing or corrupt) is not listed; a warning on stderr names it
    and the fix.
    """
    registry = reg.get()
    rows = registry.list(pattern, kind=kind, base=base, tag=tag)
    damaged = registry.damaged()
    for d in damaged:
        click.echo(f"warning: {d.ref} is damaged and not listed: {d.problem}; fix: `adapterhub rm {d.ref}` (or "
                   "restore the blob and run `adapterhub reindex`).", err=True)
    if as_json:
        _emit_json([r.to_dict() for r in rows])
        return
    if not rows:
        click.echo("no versions match", err=True)
        return
    table = [("REF", "KIND", "BASE", "SIZE", "CREATED", "TAGS")]
    for r in rows:
        table.append((r.ref, r.kind or "", (r.base_name or "")[-40:], _human(r.size or 0), (r.created_at or "")[:19],
                      ",".join(r.tags)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@cli.command(short_help="Show version REF: manifest, r, alpha, targets, files.")
@click.argument("ref")
@json_option
@pass_registry
def show(reg: _LazyRegistry, ref: str, as_json: bool) -> None:
    """Show version REF: its manifest, and r, alpha and targets (or the kind's own essentials) of the adapter."""
    info = reg.get().show(ref)
    if as_json:
        _emit_json(info)
        return
    m = info["manifest"]
    base = m.get("base") or {}
    click.echo(f"{info['ref']}  {info['digest']}")
    click.echo(f"kind        {m['kind']} ({m['format']} format)")
    click.echo(f"base        {base.get('name_or_path') or '(not recorded)'}"
               + (f"  fingerprint {base['fingerprint'][:20]}..." if base.get("fingerprint") else ""))
    if info.get("adapter"):
        for line in _adapter_lines(info["adapter"]):
            click.echo(line)
    elif info.get("adapter_error"):
        click.echo(f"adapter     not readable: {info['adapter_error']}")
    click.echo(f"created     {m['created_at']}")
    click.echo(f"tags        {', '.join(info['current_tags']) or '-'}")
    if m.get("description"):
        click.echo(f"description {m['description']}")
    if m.get("metrics"):
        click.echo(f"metrics     {json.dumps(m['metrics'], sort_keys=True)}")
    if m.get("parents"):
        click.echo(f"parents     {', '.join(p.get('ref', str(p)) for p in m['parents'])}")
    if m.get("recipe"):
        r = m["recipe"]
        opts = ", ".join(f"{k}={v}" for k, v in sorted((r.get("options") or {}).items()))
        click.echo(f"recipe      {r.get('method')}({opts})"
                   + (f" weights {r['weights']}" if r.get("weights") is not None else "")
                   + (f" seed {r['seed']}" if r.get("seed") is not None else ""))
    click.echo(f"parameters  {m.get('num_parameters', 0):,}; {_human(m.get('size') or 0)} in {len(m['files'])} file(s)")
    for f in m["files"]:
        click.echo(f"  {f['sha256'][:12]}  {_human(f['size']):>10}  {f['path']}")


@cli.command(short_help="Point TAG at version REF (moving it if it exists).")
@click.argument("ref")
@click.argument("tag")
@pass_registry
def tag(reg: _LazyRegistry, ref: str, tag: str) -> None:
    """Point TAG at version REF (moving it if it exists).

    Tags that read as numbers (1, 01, 1.0, 1e3, inf, nan) or booleans (true, false) are refused.
    """
    res = reg.get().tag(ref, tag)
    click.echo(f"{res.name}@{tag} -> {res.ref}")


@cli.command(short_help="Remove TAG from NAME.")
@click.argument("name")
@click.argument("tag")
@pass_registry
def untag(reg: _LazyRegistry, name: str, tag: str) -> None:
    """Remove TAG from NAME (untagging 'latest' makes it follow the newest push again)."""
    reg.get().untag(name, tag)
    click.echo(f"removed {name}@{tag}")


@cli.command(short_help="Remove version REF (NAME@VERSION) and its tags.")
@click.argument("ref")
@pass_registry
def rm(reg: _LazyRegistry, ref: str) -> None:
    """Remove version REF (NAME@VERSION) and its tags; `gc` frees its storage. Works on a damaged version."""
    res = reg.get().rm(ref)
    click.echo(f"removed {res.ref} {res.digest}")


@cli.command(short_help="Free unreferenced blobs, old snapshots, staging leftovers.")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@click.option("--temp-grace", type=click.FloatRange(min=0), default=3600, metavar="SECONDS",
              help="Age after which staging files no running process owns are removed (default 3600; 0: now). "
                   "Those of killed pushes go at once, those of running pushes never.")
@click.option("--grace", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Remove only unreferenced blobs (and, on S3, pending uploads) at least this old. Default: 0 on "
                   "a local registry (pushes hold a lock), 86400 on a remote one (no locks there).")
@json_option
@pass_registry
def gc(reg: _LazyRegistry, dry_run: bool, temp_grace: float, grace: float | None, as_json: bool) -> None:
    """Remove blobs no version references, snapshots of removed versions and staging leftovers.

    Reports what was removed (blobs a push referenced meanwhile are kept and said so); --dry-run
    reports the plan.
    """
    done = reg.get().gc(dry_run=dry_run, temp_grace=temp_grace, grace=grace)
    if as_json:
        _emit_json({**done.to_dict(), "dry_run": dry_run})
        return
    if dry_run:
        click.echo(f"would remove {len(done.blobs)} blob(s), {len(done.snapshots)} snapshot(s), {len(done.temp)} "
                   f"staging leftover(s): would free {_human(done.expected_freed_size)}")
        return
    click.echo(f"removed {len(done.blobs)} blob(s), {len(done.snapshots)} snapshot(s), {len(done.temp)} staging "
               f"leftover(s): freed {_human(done.freed_size)}")
    if done.kept:
        click.echo(f"kept {len(done.kept)} blob(s) a push referenced meanwhile", err=True)


@cli.command(short_help="Check every manifest and blob hash; list orphans.")
@json_option
@pass_registry
def verify(reg: _LazyRegistry, as_json: bool) -> None:
    """Check every manifest and blob hash; list orphans. Exit 1 if anything is damaged."""
    registry = reg.get()
    report = registry.verify()
    if as_json:
        _emit_json(report.to_dict())
    else:
        for p in report.problems:
            click.echo(f"{p.severity}[{p.what}] {p.where}: {p.message.splitlines()[0]}")
        state = "ok" if report.ok else "DAMAGED"
        click.echo(f"{registry.location}: {state} ({report.versions} versions, {report.blobs} blobs, "
                   f"{len(report.orphans)} orphan(s))")
    sys.exit(0 if report.ok else 1)


@cli.command(short_help="Rebuild the search index from the manifests.")
@pass_registry
def reindex(reg: _LazyRegistry) -> None:
    """Rebuild the search index from the manifests; damaged versions are skipped and named."""
    registry = reg.get()
    registry.reindex()
    damaged = registry.damaged()
    for d in damaged:
        click.echo(f"warning: skipped damaged version {d.ref}: {d.problem}; fix: `adapterhub rm {d.ref}`.", err=True)
    click.echo("index rebuilt")


# --- remotes -------------------------------------------------------------------------------------


def _render_transfer(report: Any, where: str) -> None:
    for s in report.skipped:
        click.echo(f"warning: skipped damaged version {s}", err=True)
    for line in report.copied:
        click.echo(f"copied {line}")
    for ref in report.present:
        click.echo(f"{ref} already in {where}")
    for t in report.tags:
        click.echo(f"tagged {t}")
    click.echo(f"sent {report.blobs_sent} blob(s), {_human(report.bytes_sent)}; {report.blobs_present} blob(s) "
               f"({_human(report.bytes_present)}) were there already", err=True)


def _copy_to(reg: _LazyRegistry, ref: str, to: str, endpoint_url: str | None, renumber: bool) -> None:
    """``push REF --to REMOTE``: one library call, rendered."""
    registry = reg.get()
    if to.startswith("hf://"):
        from adapterhub.registry.remotes.hf import push_to_hub

        pushed = push_to_hub(registry, ref, to, endpoint=endpoint_url)
        click.echo(f"{pushed.ref} -> {to} commit {pushed.commit} tag {pushed.tag}"
                   + ("" if pushed.created else " (already there)"))
        return
    from adapterhub.registry.remotes.sync import push_ref

    with _bar(f"pushing to {to}") as progress:
        report, dst = push_ref(registry, ref, to, endpoint_url=endpoint_url, renumber=renumber, progress=progress)
    _render_transfer(report, dst.location)


def _import_version(registry: Any, ref: str, from_: str | None, endpoint_url: str | None, renumber: bool,
                    name: str | None) -> str:
    """``pull --from REMOTE`` / ``pull hf://...``: import into the local registry; returns the local reference."""
    if ref.startswith("hf://"):
        from adapterhub.registry.remotes.hf import pull_from_hub

        result = pull_from_hub(registry, ref, name=name, endpoint=endpoint_url)
        click.echo(f"{ref} (commit {result.commit}) -> {result.ref} {result.digest}"
                   + (" (already imported)" if not result.created else ""))
        return result.ref
    from adapterhub.registry.remotes.sync import pull_ref

    assert from_ is not None
    with _bar(f"pulling from {from_}") as progress:
        report, here = pull_ref(registry, ref, from_, endpoint_url=endpoint_url, renumber=renumber,
                                progress=progress)
    _render_transfer(report, registry.location)
    click.echo(f"{here.ref} {here.digest}")
    return here.ref


@cli.group(short_help="Name remote registries: S3 buckets, shared directories.")
def remote() -> None:
    """Name remote registries (s3://BUCKET/PREFIX, file:///shared/dir) for push --to, pull --from and sync.

    Names live in the local registry's remotes.json; credentials never do (S3 reads the standard AWS
    variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL).
    """


@remote.command(name="add", short_help="Name a remote after checking that it honours conditional writes.")
@click.argument("name")
@click.argument("url")
@click.option("--endpoint-url", "endpoint_url", metavar="URL", help="S3 endpoint of a non-AWS server.")
@click.option("--replace", is_flag=True, help="Replace a remote of that name.")
@pass_registry
def remote_add(reg: _LazyRegistry, name: str, url: str, endpoint_url: str | None, replace: bool) -> None:
    """Name URL as remote NAME, after probing it: a create-if-absent of an existing key must be refused
    (If-None-Match: *) and a stale compare-and-swap too (If-Match). A server that ignores them is refused."""
    from adapterhub.registry.remotes import add_remote

    r = add_remote(reg.get(), name, url, endpoint_url=endpoint_url or reg.endpoint_url, replace=replace)
    checks = (r.probe or {}).get("checks", [])
    click.echo(f"added remote {r.name} -> {r.url}" + (f" (endpoint {r.endpoint_url})" if r.endpoint_url else "")
               + (f": {len(checks)}/{len(checks)} checks of conditional writes and checksums passed" if checks else ""))


@remote.command(name="list", short_help="List the named remotes.")
@json_option
@pass_registry
def remote_list(reg: _LazyRegistry, as_json: bool) -> None:
    """List the named remotes."""
    from adapterhub.registry.remotes import load_remotes

    remotes = load_remotes(reg.get())
    if as_json:
        _emit_json([r.to_dict() for r in remotes.values()])
        return
    for r in remotes.values():
        click.echo(f"{r.name}\t{r.url}" + (f"\t{r.endpoint_url}" if r.endpoint_url else ""))


@remote.command(name="remove", short_help="Forget a named remote (nothing on it is touched).")
@click.argument("name")
@pass_registry
def remote_remove(reg: _LazyRegistry, name: str) -> None:
    """Forget remote NAME (nothing on it is touched)."""
    from adapterhub.registry.remotes import remove_remote

    gone = remove_remote(reg.get(), name)
    click.echo(f"removed remote {gone.name} ({gone.url})")


@cli.command(short_help="Copy every version matching PATTERN from SRC to DST.")
@click.argument("src")
@click.argument("dst")
@click.argument("pattern", required=False)
@click.option("--renumber", is_flag=True,
              help="Publish a version whose number DST holds with other content under DST's next free number.")
@click.option("--endpoint-url", "endpoint_url", metavar="URL", help="S3 endpoint for s3:// URLs.")
@json_option
@pass_registry
def sync(reg: _LazyRegistry, src: str, dst: str, pattern: str | None, renumber: bool, endpoint_url: str | None,
         as_json: bool) -> None:
    """Copy every version of the names matching PATTERN (a glob, e.g. 'team/*'; default all) from SRC to DST,
    keeping numbers and digests; only blobs DST lacks are sent. SRC and DST are remote names, URLs
    (s3://, file://) or registry paths. Re-running it after an interruption resumes."""
    from adapterhub.registry.remotes.sync import sync as run_sync

    with _bar("syncing") as progress:
        report, a, b = run_sync(reg.get(), src, dst, pattern, endpoint_url=endpoint_url or reg.endpoint_url,
                                renumber=renumber, progress=progress)
    if as_json:
        _emit_json(report.to_dict())
        return
    _render_transfer(report, b.location)


@cli.command(short_help="Bytes stored, saved by dedup, and the cost as merged copies.")
@json_option
@pass_registry
def du(reg: _LazyRegistry, as_json: bool) -> None:
    """Storage economics of the registry: bytes stored, bytes saved by deduplication, and what the same
    versions would cost as full merged copies of their bases (base sizes recorded by push --base)."""
    from adapterhub.registry.usage import usage

    u = usage(reg.get())
    if as_json:
        _emit_json(u.to_dict())
        return
    click.echo(f"{u.location}: {u.versions} version(s), {u.blobs} blob(s)")
    rows = [("stored", u.stored_bytes, "every blob, orphans included" if u.orphan_bytes else "every blob"),
            ("as whole copies", u.logical_bytes, "each version's files stored separately"),
            ("saved by dedup", u.dedup_saved_bytes, "shared files stored once")]
    if u.merged_bytes:
        ratio = u.merged_ratio or 0
        rows.append(("as merged models", u.merged_bytes,
                     f"{u.versions - u.unpriced} version(s) as full copies of their bases: {ratio:,.0f}x their "
                     "adapters"))
    for label, n, what in rows:
        click.echo(f"  {label:<17}{_human(n):>12}  {what}")
    if u.unpriced:
        click.echo(f"  {u.unpriced} version(s) have no recorded base size (push --base records it)")
    for b in u.bases:
        merged = f", merged {_human(b.merged_bytes)}" if b.merged_bytes else ""
        click.echo(f"  base {b.base}: {b.versions} version(s), adapters {_human(b.adapter_bytes)}{merged}")


# --- compose -------------------------------------------------------------------------------------


@cli.command(short_help="Blend adapters into one (linear, svd, ties, dare...).")
@click.argument("sources", nargs=-1)
@click.option("--weights", help="Comma-separated weights, one per source (default: all 1). Negative negates a task.")
@click.option("--method", type=click.Choice(list(METHODS)), default="linear", show_default=True,
              help="Blend method. " + _method_help() + ".")
@method_options
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, path_type=str),
              help="Blend exactly what this recipe file says (instead of SOURCES and options).")
@click.option("--save-recipe", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the recipe (JSON) to this file; its folder must exist (--force replaces a file).")
@click.option("--push", "push_target", metavar="NAME[@VERSION]", help="Push the result with its lineage.")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Write the result to this directory.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="peft", show_default=True, help="Format for -o.")
@click.option("--force", is_flag=True, help="Replace OUTPUT (and the --save-recipe file) if they exist.")
@allow_pickle_option
@click.pass_context
@pass_registry
def blend(reg: _LazyRegistry, ctx: click.Context, sources: tuple[str, ...], weights: str | None, method: str,
          recipe_file: str | None, save_recipe: str | None, push_target: str | None, output: str | None, fmt: str,
          force: bool, allow_pickle: bool, **kwargs: Any) -> None:
    """Blend SOURCES (registry references or adapter directories) into one adapter, written with -o
    or pushed with --push.

    Compatibility is checked before any math; incompatible inputs print the check's report. Every
    output (-o, --save-recipe) is checked before the blend runs.
    """
    from adapterhub.sources import blend_sources

    options = _given_method_options(kwargs)
    if (push_target is None) == (output is None):
        raise click.UsageError("give exactly one of --push NAME[@VERSION] or -o DIR")
    reg.create = push_target is not None  # -o only reads references: a mistyped --registry stays a typo
    if recipe_file and sources:
        raise click.UsageError("give SOURCES or --recipe, not both")
    if not recipe_file and not sources:
        raise click.UsageError("give at least one SOURCE, or --recipe FILE")
    if recipe_file and (weights or options or ctx.get_parameter_source("method").name != "DEFAULT"):
        raise click.UsageError("--recipe fixes weights, method and options; do not give them as well")
    w = None
    if weights:
        try:
            w = [float(x) for x in weights.split(",")]
        except ValueError as e:
            raise click.BadParameter(f"{weights!r} is not a comma-separated list of numbers",
                                     param_hint="--weights") from e
        if len(w) != len(sources):
            raise click.BadParameter(f"{len(w)} weight(s) for {len(sources)} source(s); give one per source",
                                     param_hint="--weights")
    outcome = blend_sources(list(sources), w, method, options, recipe=recipe_file, registry=reg.get,
                            allow_pickle=allow_pickle, output=output, format=fmt, overwrite=force,
                            push=push_target, save_recipe=save_recipe)
    t = outcome.truncation
    if t:
        click.echo(f"truncation: relative error max {t['max']:.3g} ({t['module']}), mean {t['mean']:.3g} over "
                   f"{t['modules']} modules", err=True)
    if outcome.pushed is not None:
        if outcome.pushed.duplicate:
            click.echo(f"{outcome.pushed.ref} already holds identical content; nothing pushed")
        click.echo(f"{outcome.pushed.ref} {outcome.pushed.digest}")
    else:
        click.echo(f"wrote {outcome.recipe.method} blend to {outcome.path}")


@cli.command(name="export", short_help="Fold adapters into the base; write a checkpoint.")
@click.argument("sources", nargs=-1, required=True, metavar="SRC[=WEIGHT]...")
@click.option("--base", "base_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Base model directory (config.json + safetensors, single or sharded).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Directory to write.")
@click.option("--method", type=click.Choice(list(METHODS)),
              help="Blend the sources with this method first (else each is folded with its weight). "
                   "The options below need it.")
@method_options
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB.")
@click.option("--dtype", help="Output dtype of floating tensors: bfloat16, float16, float32 (default: the base's).")
@click.option("--keep-unmerged", is_flag=True,
              help="Write prefix/bottleneck adapters (they cannot be folded) beside the checkpoint, not fail.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@allow_pickle_option
@pass_registry
def export_(reg: _LazyRegistry, sources: tuple[str, ...], base_dir: str, output: str, method: str | None,
            max_shard_size: str, dtype: str | None, keep_unmerged: bool, force: bool, allow_pickle: bool,
            **kwargs: Any) -> None:
    """Fold adapters into the base and write a standard (sharded) safetensors checkpoint, with every
    other file of the base (config, tokenizer, sentence-transformers modules) copied.

    SRC is a registry reference, an adapter directory or a blend recipe (.json), optionally with
    =WEIGHT. Streams tensor by tensor: memory stays about one tensor whatever the model size.
    """
    from adapterhub.sources import export_sources

    options = _given_method_options(kwargs)
    if options and method is None:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in options)
        verb = "applies" if len(options) == 1 else "apply"
        raise click.UsageError(f"{flags} {verb} only to a blend: add --method (e.g. --method svd), or drop "
                               f"{'it' if len(options) == 1 else 'them'} (without --method every source is "
                               "folded with its weight)")
    result = export_sources(list(sources), base_dir, output, method=method, options=options, registry=reg.get,
                            allow_pickle=allow_pickle, overwrite=force, max_shard_size=max_shard_size, dtype=dtype,
                            keep_unmerged=keep_unmerged)
    _warn(f"warning: {w}" for w in result.warnings)
    click.echo(f"wrote {len(result.shards)} shard(s), {_human(result.total_size)}, {len(result.folded)} tensors "
               f"changed -> {result.path}")
    for u in result.unmerged:
        click.echo(f"  not merged (load as adapter): {result.path / u}")


# --- runtime: a quick look at a composition (adapterhub.runtime) -----------------------------------


@cli.command(name="run", short_help="Run a prompt without and with a composition attached.")
@click.argument("sources", nargs=-1, required=True, metavar="SRC[=WEIGHT]...")
@click.option("--base", "base_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Base model directory (loaded with transformers).")
@click.option("--prompt", help="Text to run (needs the base's tokenizer).")
@click.option("--ids", "token_ids", help="Comma-separated token ids to run instead of a prompt.")
@click.option("--sum", "block", flag_value="sum", help="Sum(SRC..., weights): LoRA/IA3 with =WEIGHT each.")
@click.option("--average", "block", flag_value="average", help="Average(SRC..., weights), the adapters library's.")
@click.option("--stack", "block", flag_value="stack", default=True, help="Stack(SRC...) (default).")
@click.option("--max-new-tokens", default=20, show_default=True, help="Tokens to generate (causal LMs).")
@allow_pickle_option
@pass_registry
def run_(reg: _LazyRegistry, sources: tuple[str, ...], base_dir: str, prompt: str | None, token_ids: str | None,
         block: str, max_new_tokens: int, allow_pickle: bool) -> None:
    """Run a prompt through the base, then with the sources attached (a quick look; no file is written).

    SRC is a registry reference or an adapter directory. Causal LMs print the greedy continuation
    without and with the composition; encoders how far the mean-pooled output moved.
    """
    from adapterhub import Average, Stack, Sum, resolve_adapter
    from adapterhub.runtime.prompt import run_prompt
    from adapterhub.sources import parse_weighted

    leaves, weights = zip(*(parse_weighted(s) for s in sources), strict=True)
    if block == "stack" and any(w != 1.0 for w in weights):
        raise click.UsageError("weights (SRC=WEIGHT) need --sum or --average.")
    try:
        ids = [int(t) for t in token_ids.replace(",", " ").split()] if token_ids else None
    except ValueError as e:
        raise click.UsageError(f"--ids takes integers, e.g. --ids 1,2,3 ({e}).") from e
    tree = (Sum(*leaves, weights=weights) if block == "sum" else Average(*leaves, weights=weights)
            if block == "average" else Stack(*leaves))
    result = run_prompt(base_dir, tree, prompt=prompt, token_ids=ids, max_new_tokens=max_new_tokens,
                        resolve=lambda leaf: resolve_adapter(leaf, registry=reg.get, allow_pickle=allow_pickle))
    click.echo(result.summary)
    if result.kind == "generate":
        click.echo(f"base      {result.base}")
        click.echo(f"attached  {result.attached}")
    else:
        click.echo(f"mean-pooled output: cosine similarity {result.cosine:.4f} to the base's, "
                   f"max |diff| {result.max_abs_diff:.4g}")


# --- extract: full fine-tune -> LoRA --------------------------------------------------------------


@cli.command(name="extract", short_help="Turn a full fine-tune into a LoRA against its base.")
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The base model directory (config.json + safetensors, single or sharded).")
@click.option("--tuned", "tuned_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The full fine-tune of that base, same layout.")
@click.option("--rank", type=int, help="Rank of every module; with --energy/--max-error the most any module gets.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ||tuned - base||^2.")
@click.option("--max-error", type=float,
              help="Per module, the smallest rank whose relative error ||D - D_k|| / ||D|| is at most this.")
@click.option("--target", metavar="REGEX", help="Only modules whose path matches are extracted.")
@click.option("--exclude", metavar="REGEX", help="Modules whose path matches are left out (and listed).")
@click.option("--dtype", help="dtype of the LoRA factors: bfloat16, float16, float32 (default: the fine-tune's).")
@click.option("--allow-other-base", is_flag=True,
              help="Extract even if a module changed by more than 50% of its norm (not a fine-tune of --base).")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Write the PEFT adapter to this directory.")
@click.option("--push", "push_target", metavar="NAME[@VERSION]", help="Push it to the registry with its lineage.")
@click.option("--tag", "tags", multiple=True, help="Tag to point at the pushed version (repeatable).")
@click.option("--description", help="Free text for the pushed manifest.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@json_option
@pass_registry
def extract_(reg: _LazyRegistry, base_dir: str, tuned_dir: str, rank: int | None, energy: float | None,
             max_error: float | None, target: str | None, exclude: str | None, dtype: str | None,
             allow_other_base: bool, output: str | None, push_target: str | None, tags: tuple[str, ...],
             description: str | None, force: bool, as_json: bool) -> None:
    """Turn a full fine-tune into a LoRA against its base: a truncated SVD of tuned - base, module by module.

    Tensors equal to the base are not stored; changed norms and biases are carried exactly. Prints the
    max/mean relative error and the bytes saved against the full copy.
    """
    from adapterhub import extraction

    if (push_target is None) == (output is None):
        raise click.UsageError("give exactly one of -o DIR or --push NAME[@VERSION]")
    with _progress(extraction.input_bytes(base_dir, tuned_dir), "reading") as progress:
        outcome = extraction.extract_to(
            base_dir, tuned_dir, output=output, push_to=push_target, registry=reg.get, tags=tags,
            description=description, overwrite=force, rank=rank, energy=energy, max_error=max_error, target=target,
            exclude=exclude, dtype=dtype, allow_other_base=allow_other_base, progress=progress)
    result = outcome.result
    where = ({"output": str(outcome.path)} if outcome.path is not None
             else {"ref": outcome.pushed.ref, "digest": outcome.pushed.digest})
    info = {**result.summary(), **where}
    if as_json:
        _emit_json(info)
        return
    for name, why in sorted(info["not_extracted"].items()):
        click.echo(f"warning: {name} changed but is not in the adapter ({why})", err=True)
    for note in info["notes"]:
        click.echo(f"note: {note}", err=True)
    ranks = info["ranks"]
    rank_s = "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    click.echo(f"extracted   {info['modules']} modules, rank {rank_s}, from {tuned_dir} against {base_dir}")
    if info["modules"]:
        click.echo(f"error       max {info['max_error']:.4g} ({info['max_error_module']}), "
                   f"mean {info['mean_error']:.4g} (relative Frobenius error of tuned - base)")
    if info["modules_to_save"]:
        click.echo(f"saved whole {', '.join(info['modules_to_save'])} (modules_to_save)")
    click.echo(f"unchanged   {info['unchanged_tensors']} tensors equal to the base: not stored"
               + (f"; {len(info['rounding_only'])} differ only by rounding to the fine-tune's dtype"
                  if info["rounding_only"] else ""))
    full, size = info["full_bytes"], info["adapter_bytes"]
    click.echo(f"size        {_human(size)} of tensors vs {_human(full)} for the full fine-tune: "
               f"{_human(full - size)} saved ({full / max(size, 1):.0f}x smaller)")
    click.echo(f"{where['ref']} {where['digest']}" if push_target else f"wrote {where['output']}")


def main() -> None:
    """Console entry point."""
    cli(prog_name="adapterhub")


if __name__ == "__main__":
    main()
