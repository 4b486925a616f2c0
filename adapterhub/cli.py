"""The ``adapterhub`` command line: parse, call one library function, render. No logic lives here.

Heavy modules (torch, safetensors) are imported inside commands so ``adapterhub --help`` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click

EXIT_INCOMPATIBLE = 1
EXIT_UNREADABLE = 2


def _fail(exc: Exception) -> NoReturn:
    """Render a library error as one message and exit: 2 for unreadable input, 1 otherwise."""
    from adapterhub.errors import BaseCheckpointError, FormatError

    if os.environ.get("ADAPTERHUB_DEBUG"):
        raise exc
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_UNREADABLE if isinstance(exc, (FormatError, BaseCheckpointError)) else 1)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True, envvar="ADAPTERHUB_ALLOW_PICKLE",
    help="Also read pickle .bin weights (with torch.load(weights_only=True)). Only for files you trust.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterhub")
def cli() -> None:
    """Store, check, compose and ship adapters for shared base models."""


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
             f"base        {base_s}"]
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
        lines.append(f"feedforward {len(info['ia3']['feedforward_modules'])} module(s) scale their input")
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
    lines.append(f"parameters  {info['num_parameters']:,} in {info['num_tensors']} tensors "
                 f"({', '.join(info['dtypes'])})")
    if "size_on_disk" in info:
        lines.append(f"on disk     {_human(info['size_on_disk'])}")
    return "\n".join(lines)


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


def main() -> None:
    """Console entry point."""
    cli(prog_name="adapterhub")


if __name__ == "__main__":
    main()
