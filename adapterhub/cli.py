"""The ``adapterhub`` command line: parse, call one library function, render. No logic lives here.

Heavy modules (torch, safetensors) are imported inside commands so ``adapterhub --help`` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

EXIT_INCOMPATIBLE = 1
EXIT_UNREADABLE = 2


def _fail(exc: Exception) -> NoReturn:
    """Render a library error as one message and exit: 2 for unreadable input or a bad reference, 1 otherwise."""
    from adapterhub.errors import BaseCheckpointError, FormatError, InvalidReferenceError

    if os.environ.get("ADAPTERHUB_DEBUG"):
        raise exc
    report = getattr(exc, "report", None)
    if report is not None:
        for p in report.problems:
            click.echo(p.line(), err=True)
    click.echo(f"error: {exc}", err=True)
    unreadable = (FormatError, BaseCheckpointError, InvalidReferenceError)
    sys.exit(EXIT_UNREADABLE if isinstance(exc, unreadable) else 1)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into one rendered message and an exit status."""
    from adapterhub.errors import AdapterHubError

    try:
        yield
    except AdapterHubError as e:
        _fail(e)


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing when piped."""
    if not sys.stderr.isatty() or total <= 0:
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True, envvar="ADAPTERHUB_ALLOW_PICKLE",
    help="Also read pickle .bin weights (with torch.load(weights_only=True)). Only for files you trust.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


class _LazyRegistry:
    """Opens the registry on first use, so commands that need none never create one."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._registry = None

    def get(self):  # noqa: ANN201 - Registry, imported lazily
        if self._registry is None:
            from adapterhub.registry import Registry

            with _errors():
                self._registry = Registry(self.path)
        return self._registry


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterhub")
@click.option("--registry", "registry_path", envvar="ADAPTERHUB_REGISTRY", type=click.Path(file_okay=False),
              help="Registry directory [env: ADAPTERHUB_REGISTRY; default: ~/.local/share/adapterhub/registry].")
@click.pass_context
def cli(ctx: click.Context, registry_path: str | None) -> None:
    """Store, check, compose and ship adapters for shared base models."""
    ctx.obj = _LazyRegistry(registry_path)


pass_registry = click.make_pass_decorator(_LazyRegistry)


@cli.command()
@click.argument("adapter", type=click.Path(file_okay=False, path_type=str))
@allow_pickle_option
@json_option
def inspect(adapter: str, allow_pickle: bool, as_json: bool) -> None:
    """Print an adapter's kind, base, targets, ranks, parameter count and size on disk."""
    from adapterhub.adapter import summarize
    from adapterhub.errors import AdapterHubError
    from adapterhub.formats import detect, read_adapter

    try:
        fmt = detect(adapter)
        info = summarize(read_adapter(adapter, format=fmt, allow_pickle=allow_pickle))
    except AdapterHubError as e:
        _fail(e)
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
    return lines


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cli.command()
@click.argument("adapter", type=click.Path(file_okay=False, path_type=str))
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Base model directory (config.json + safetensors).")
@click.option("--strict-identity", is_flag=True, help="A different recorded base name is an error, not a warning.")
@allow_pickle_option
@json_option
def check(adapter: str, base_dir: str, strict_identity: bool, allow_pickle: bool, as_json: bool) -> None:
    """Check that ADAPTER applies to the base model at --base.

    Exit status: 0 compatible, 1 incompatible, 2 unreadable input.
    """
    from adapterhub.base import BaseCheckpoint
    from adapterhub.compose.checks import check_adapter
    from adapterhub.errors import AdapterHubError
    from adapterhub.formats import read_adapter

    try:
        a = read_adapter(adapter, allow_pickle=allow_pickle)
        base = BaseCheckpoint.open(base_dir)
        report = check_adapter(a, base, subject=adapter, strict_identity=strict_identity)
    except AdapterHubError as e:
        _fail(e)
    if as_json:
        _emit_json(report.to_dict())
    else:
        for p in report.problems:
            click.echo(p.line())
        click.echo(report.summary())
    sys.exit(0 if report.ok else EXIT_INCOMPATIBLE)


@cli.command()
@click.argument("adapter", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Directory to write.")
@click.option("--format", "fmt", type=click.Choice(["peft", "adapters", "adapterhub"]), default="peft",
              show_default=True, help="Format to write.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False, path_type=str),
              help="Base model: checked first, its fingerprint recorded, and its config used where a format needs "
                   "model details (prefix layout, `adapters` model class).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@allow_pickle_option
def convert(adapter: str, output: str, fmt: str, base_dir: str | None, force: bool, allow_pickle: bool) -> None:
    """Read ADAPTER in any format and write it to OUTPUT in --format."""
    from adapterhub.convert import convert_adapter
    from adapterhub.errors import AdapterHubError

    try:
        path, report = convert_adapter(adapter, output, format=fmt, base=base_dir, overwrite=force,
                                       allow_pickle=allow_pickle)
    except AdapterHubError as e:
        if getattr(e, "report", None) is not None:
            for p in e.report.problems:
                click.echo(p.line(), err=True)
        _fail(e)
    for p in report.problems if report else ():
        click.echo(p.line(), err=True)
    click.echo(f"wrote {fmt} adapter to {path}")


# --- registry ------------------------------------------------------------------------------------


@cli.command(short_help="Store an adapter directory as NAME[@VERSION].")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("target", metavar="NAME[@VERSION]")
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
def push(reg: _LazyRegistry, directory: str, target: str, tags: tuple[str, ...], description: str,
         base_dir: str | None, metrics: tuple[str, ...], include: tuple[str, ...], include_all: bool,
         allow_duplicate: bool, allow_pickle: bool) -> None:
    """Store the adapter in DIRECTORY as NAME[@VERSION]; prints NAME@VERSION sha256:DIGEST last.

    Stores what an adapter directory is (adapter configs, the weights, README, tokenizer files,
    generation/chat templates) and lists what it left out; --include GLOB or --include-all store more.
    Pickles (*.bin, *.pt, *.pth, *.pkl, *.ckpt) are stored only with --allow-pickle.
    """
    parsed = {}
    for m in metrics:
        key, sep, value = m.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{m!r} is not KEY=VALUE", param_hint="--metric")
        parsed[key] = _number(value)
    from adapterhub.registry.refs import check_tag, check_target

    with _errors():  # refuse bad names before the registry is even created
        check_target(target)
        for t in tags:
            check_tag(t)
    registry = reg.get()
    total = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    with _errors(), _progress(total, "pushing") as progress:
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
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Directory to write.")
@click.option("--format", "fmt", type=click.Choice(["peft", "adapters", "adapterhub"]), default=None,
              help="Write in this format. Default: PEFT where PEFT can express the adapter (LoRA, IA3, prefix "
                   "tuning, blends of them), else the format it was stored in.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
@click.option("--link", is_flag=True,
              help="Hard-link files from the registry (instant; re-hashes only changed blobs; never edit them).")
@pass_registry
def pull(reg: _LazyRegistry, ref: str, output: str, fmt: str | None, force: bool, link: bool) -> None:
    """Write version REF to a directory, verifying every hash.

    Without --format, a LoRA, IA3 or prefix-tuning version (blends included) is written as a PEFT
    directory; other kinds keep the format they were stored in, and the command says so.
    """
    registry = reg.get()
    with _errors():
        chosen = registry.pull_format(ref, fmt or "auto")
        size = int(registry.manifest(ref).get("size") or 0)
        with _progress(size, "pulling") as progress:
            path = registry.pull(ref, output, format=chosen.format, overwrite=force, link=link, progress=progress)
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
    with _errors():
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
    with _errors():
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
        click.echo(f"recipe      {r.get('method')}({opts}) weights {r.get('weights')}"
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
    with _errors():
        res = reg.get().tag(ref, tag)
    click.echo(f"{res.name}@{tag} -> {res.ref}")


@cli.command(short_help="Remove TAG from NAME.")
@click.argument("name")
@click.argument("tag")
@pass_registry
def untag(reg: _LazyRegistry, name: str, tag: str) -> None:
    """Remove TAG from NAME (untagging 'latest' makes it follow the newest push again)."""
    with _errors():
        reg.get().untag(name, tag)
    click.echo(f"removed {name}@{tag}")


@cli.command(short_help="Remove version REF (NAME@VERSION) and its tags.")
@click.argument("ref")
@pass_registry
def rm(reg: _LazyRegistry, ref: str) -> None:
    """Remove version REF (NAME@VERSION) and its tags; `gc` frees its storage. Works on a damaged version."""
    with _errors():
        res = reg.get().rm(ref)
    click.echo(f"removed {res.ref} {res.digest}")


@cli.command(short_help="Free unreferenced blobs, old snapshots, staging leftovers.")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@click.option("--temp-grace", type=click.FloatRange(min=0), default=3600, metavar="SECONDS",
              help="Age after which staging files no running process owns are removed (default 3600; 0: now). "
                   "Those of killed pushes go at once, those of running pushes never.")
@json_option
@pass_registry
def gc(reg: _LazyRegistry, dry_run: bool, temp_grace: float, as_json: bool) -> None:
    """Remove blobs no version references, snapshots of removed versions and staging leftovers.

    Reports what was removed (blobs a push referenced meanwhile are kept and said so); --dry-run
    reports the plan.
    """
    with _errors():
        done = reg.get().gc(dry_run=dry_run, temp_grace=temp_grace)
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
    with _errors():
        report = registry.verify()
    if as_json:
        _emit_json(report.to_dict())
    else:
        for p in report.problems:
            click.echo(f"{p.severity}[{p.what}] {p.where}: {p.message.splitlines()[0]}")
        state = "ok" if report.ok else "DAMAGED"
        click.echo(f"{registry.root}: {state} ({report.versions} versions, {report.blobs} blobs, "
                   f"{len(report.orphans)} orphan(s))")
    sys.exit(0 if report.ok else 1)


@cli.command(short_help="Rebuild the search index from the manifests.")
@pass_registry
def reindex(reg: _LazyRegistry) -> None:
    """Rebuild the search index from the manifests; damaged versions are skipped and named."""
    with _errors():
        registry = reg.get()
        registry.reindex()
        damaged = registry.damaged()
    for d in damaged:
        click.echo(f"warning: skipped damaged version {d.ref}: {d.problem}; fix: `adapterhub rm {d.ref}`.", err=True)
    click.echo("index rebuilt")


# --- compose -------------------------------------------------------------------------------------


@cli.command()
@click.argument("sources", nargs=-1)
@click.option("--weights", help="Comma-separated weights, one per source (default: all 1). Negative negates a task.")
@click.option("--method", default="linear", show_default=True,
              help="linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune.")
@click.option("--rank", type=int, help="Target rank (svd, ties, dare_*, magnitude_prune).")
@click.option("--density", type=float, help="Fraction of values kept (ties, dare_*, magnitude_prune).")
@click.option("--seed", type=int, help="Seed of the random drops (dare_*).")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, path_type=str),
              help="Blend exactly what this recipe file says (instead of SOURCES and options).")
@click.option("--save-recipe", type=click.Path(dir_okay=False, path_type=str), help="Also write the recipe here.")
@click.option("--push", "push_target", metavar="NAME[@VERSION]", help="Push the result with its lineage.")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Write the result to this directory.")
@click.option("--format", "fmt", type=click.Choice(["peft", "adapters", "adapterhub"]), default="peft",
              show_default=True, help="Format for -o.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@allow_pickle_option
@pass_registry
def blend(reg: _LazyRegistry, sources: tuple[str, ...], weights: str | None, method: str, rank: int | None,
          density: float | None, seed: int | None, recipe_file: str | None, save_recipe: str | None,
          push_target: str | None, output: str | None, fmt: str, force: bool, allow_pickle: bool) -> None:
    """Blend SOURCES (registry references or adapter directories) into one adapter.

    Compatibility is checked before any math; incompatible inputs print the check's report.
    """
    from adapterhub.recipe import Recipe, load_sources, run_recipe

    if (push_target is None) == (output is None):
        raise click.UsageError("give exactly one of --push NAME[@VERSION] or -o DIR")
    if recipe_file and sources:
        raise click.UsageError("give SOURCES or --recipe, not both")
    if not recipe_file and not sources:
        raise click.UsageError("give at least one SOURCE, or --recipe FILE")
    registry = None
    needs_registry = push_target is not None or recipe_file is not None or any(not Path(s).is_dir() for s in sources)
    if needs_registry:
        registry = reg.get()
    with _errors():
        if recipe_file:
            recipe = Recipe.load(recipe_file)
        else:
            w = [1.0] * len(sources)
            if weights:
                try:
                    w = [float(x) for x in weights.split(",")]
                except ValueError as e:
                    raise click.BadParameter(f"{weights!r} is not a comma-separated list of numbers",
                                             param_hint="--weights") from e
            options = {k: v for k, v in (("rank", rank), ("density", density)) if v is not None}
            _, pinned = load_sources(list(sources), registry, allow_pickle=allow_pickle)
            recipe = Recipe(pinned, w, method, options, seed)
        result = run_recipe(recipe, registry, allow_pickle=allow_pickle)
        errors = (result.extra.get("blend") or {}).get("relative_error") or {}
        if errors:
            worst = max(errors, key=errors.get)
            click.echo(f"truncation: relative error max {errors[worst]:.3g} ({worst}), "
                       f"mean {sum(errors.values()) / len(errors):.3g} over {len(errors)} modules", err=True)
        if save_recipe:
            recipe.save(save_recipe)
        if push_target:
            parents = [{"ref": s.get("ref") or s["path"], "digest": s["digest"], "weight": w}
                       for s, w in zip(recipe.sources, recipe.weights, strict=True)]
            pushed = registry.push(result, push_target, parents=parents, recipe=recipe.to_dict(),
                                   description=f"{recipe.method} blend of {len(parents)} adapters")
            click.echo(f"{pushed.ref} {pushed.digest}")
        else:
            from adapterhub.formats import write_adapter

            path = write_adapter(result, output, format=fmt, overwrite=force)
            click.echo(f"wrote {recipe.method} blend to {path}")


@cli.command(name="export")
@click.argument("sources", nargs=-1, required=True, metavar="SRC[=WEIGHT]...")
@click.option("--base", "base_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Base model directory (config.json + safetensors, single or sharded).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Directory to write.")
@click.option("--method", help="Blend the sources with this method first (else each is folded with its weight).")
@click.option("--rank", type=int, help="Target rank for --method svd/ties/dare_*/magnitude_prune.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB.")
@click.option("--dtype", help="Output dtype of floating tensors: bfloat16, float16, float32 (default: the base's).")
@click.option("--keep-unmerged", is_flag=True,
              help="Write prefix/bottleneck adapters (they cannot be folded) beside the checkpoint, not fail.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@allow_pickle_option
@pass_registry
def export_(reg: _LazyRegistry, sources: tuple[str, ...], base_dir: str, output: str, method: str | None,
            rank: int | None, max_shard_size: str, dtype: str | None, keep_unmerged: bool, force: bool,
            allow_pickle: bool) -> None:
    """Fold adapters into the base and write a standard (sharded) safetensors checkpoint.

    SRC is a registry reference, an adapter directory or a blend recipe (.json), optionally with
    =WEIGHT. Streams tensor by tensor: memory stays about one tensor whatever the model size.
    """
    from adapterhub.export import export_merged
    from adapterhub.recipe import Recipe, load_sources, run_recipe

    specs, weights = [], []
    for src in sources:
        path, sep, w = src.rpartition("=")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            path, weight = src, 1.0
        specs.append(path if sep and path else src)
        weights.append(weight)
    with _errors():
        registry = None
        if any(not Path(s).exists() for s in specs):
            registry = reg.get()
        adapters, provenance_sources = [], []
        for spec, w in zip(specs, weights, strict=True):
            if Path(spec).is_file():
                recipe = Recipe.load(spec)
                if recipe.sources and any("ref" in s for s in recipe.sources) and registry is None:
                    registry = reg.get()
                adapters.append(run_recipe(recipe, registry, allow_pickle=allow_pickle))
                provenance_sources.append({"recipe": recipe.to_dict(), "weight": w})
            else:
                loaded, pinned = load_sources([spec], registry, allow_pickle=allow_pickle)
                adapters += loaded
                provenance_sources.append({**pinned[0], "weight": w})
        if method:
            from adapterhub.compose.blend import blend

            options = {"rank": rank} if rank is not None else {}
            adapters = [blend(adapters, weights, method, labels=specs, **options)]
            weights = [1.0]
        provenance = {"sources": provenance_sources, "method": method or "stack", "rank": rank}
        result = export_merged(base_dir, adapters, output, weights=weights, max_shard_size=max_shard_size,
                               dtype=dtype, keep_unmerged=keep_unmerged, provenance=provenance, overwrite=force)
    click.echo(f"wrote {len(result.shards)} shard(s), {_human(result.total_size)}, {len(result.folded)} tensors "
               f"changed -> {result.path}")
    for u in result.unmerged:
        click.echo(f"  not merged (load as adapter): {result.path / u}")


def main() -> None:
    """Console entry point."""
    cli(prog_name="adapterhub")


if __name__ == "__main__":
    main()
