"""Blend and export from what a user names: ``SRC[=WEIGHT]`` strings that are adapter directories,
registry references or (for export) recipe files.

This layer resolves references (opening the registry only when a source needs it), pins every
source by digest for provenance and lineage, checks every output path before any work, and then
calls the pure functions of :mod:`adapterhub.compose` and :mod:`adapterhub.export`, which never see
a registry. The CLI's ``blend`` and ``export`` are one call each into here.

Example:
    >>> out = blend_sources(["team/a", "my-lora"], [0.7, 0.3], "svd", {"rank": 16},
    ...                     registry=Registry("reg"), output="blended")          # doctest: +SKIP
    >>> out.path, out.recipe.sources[0]["digest"]                                # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import BlendError, BlendOptionError, MissingFileError, RecipeError
from adapterhub.paths import pending_text_file, probe_directory, reading, shown
from adapterhub.recipe import Recipe, directory_digest, run_recipe

if TYPE_CHECKING:
    from adapterhub.adapter import Adapter
    from adapterhub.export import ExportResult
    from adapterhub.registry import Registry
    from adapterhub.registry.registry import PushResult

def parse_weighted(spec: str) -> tuple[str, float]:
    """Split ``SRC=WEIGHT`` (``"team/a=0.6"`` -> ``("team/a", 0.6)``); without ``=`` the weight is 1.

    A path that exists as written is never split, so a folder named ``a=1`` still works.

    Raises:
        BlendError: the weight is not a finite number (``team/a=nan``, ``team/a=``).
    """
    src, sep, text = spec.rpartition("=")
    if not sep or os.path.lexists(spec):
        return spec, 1.0
    try:
        weight = float(text)
    except ValueError:
        if src and not text.strip():
            raise BlendError(f"{spec!r}: the weight after '=' is missing.\n  fix: write SRC=WEIGHT, e.g. "
                             f"{src}=0.5.") from None
        if src and os.path.lexists(src):  # `dir=abc`: a weight that is no number, not a name holding '='
            raise BlendError(f"{spec!r}: the weight {text!r} after '=' is not a number.\n  fix: write SRC=WEIGHT "
                             f"with a number, e.g. {src}=0.5.") from None
        return spec, 1.0  # an '=' that is part of a name
    if not src:
        raise BlendError(f"{spec!r} names no source before '='.\n  fix: write SRC=WEIGHT, e.g. team/a=0.5.")
    if not math.isfinite(weight):
        raise BlendError(f"{spec!r}: the weight must be a finite number, not {text!r}.\n  fix: write SRC=WEIGHT "
                         f"with a number, e.g. {src}=0.5.")
    return src, weight


def looks_like_path(spec: str) -> bool:
    """A source written as a path (``./x``, ``/x``, ``~/x``, ``../x``) or one that exists on disk;
    anything else is a registry reference."""
    return os.path.lexists(spec) or spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


@dataclass(frozen=True)
class Source:
    """One resolved input: the adapter, its pin for provenance/lineage and the path it was read from."""

    spec: str
    adapter: Adapter
    pin: dict[str, Any]
    path: Path | None = None


class _Registry:
    """Opens the registry on first use. (The output guard finds a registry by its marker file.)"""

    def __init__(self, registry: Any) -> None:
        self._arg, self._registry = registry, None

    def get(self, spec: str) -> Registry:
        if self._registry is None:
            if self._arg is None:
                raise RecipeError(f"{spec!r} is no adapter directory, and no registry was given to resolve it as "
                                  "a reference.\n  fix: check the path, or pass a registry.")
            self._registry = self._arg() if callable(self._arg) else self._arg
        return self._registry


def _open(spec: str, registry: _Registry, *, allow_pickle: bool, recipes: bool = False) -> Source:
    from adapterhub.formats import read_adapter

    path = Path(spec).expanduser()
    if recipes and path.is_file():
        recipe = Recipe.load(path)
        reg = registry.get(spec) if any("ref" in s for s in recipe.sources) else None
        paths = [Path(s["path"]) for s in recipe.sources if "path" in s]
        with reading(*paths):
            adapter = run_recipe(recipe, reg, allow_pickle=allow_pickle)
        return Source(spec, adapter, {"recipe": recipe.to_dict()}, path)
    if looks_like_path(spec):
        if not os.path.lexists(path):
            raise MissingFileError(f"{shown(spec)} does not exist.\n  fix: check the path; a registry reference is "
                                   "written NAME[@VERSION], e.g. team/sentiment@2.", path=path)
        adapter = read_adapter(path, allow_pickle=allow_pickle)
        return Source(spec, adapter, {"path": spec, "digest": directory_digest(path)}, path)
    reg = registry.get(spec)
    res = reg.resolve(spec)
    adapter = reg.load(f"{res.name}@{res.digest}", allow_pickle=allow_pickle)
    return Source(spec, adapter, {"ref": res.ref, "digest": res.digest})


def open_sources(specs: Sequence[str], registry: Any = None, *, allow_pickle: bool = False,
                 recipes: bool = False) -> list[Source]:
    """Resolve source strings: an existing directory (or path) is read, anything else is a registry
    reference; with ``recipes``, a file is a blend recipe, blended as it says.

    ``registry`` is a :class:`~adapterhub.registry.Registry`, a function returning one (called only
    if a source needs it), or None.
    """
    reg = _Registry(registry)
    return [_open(s, reg, allow_pickle=allow_pickle, recipes=recipes) for s in specs]


# --- blend -----------------------------------------------------------------------------------------


@dataclass
class BlendOutcome:
    """A blend and where it went: the adapter, the recipe that reproduces it, its lineage."""

    adapter: Adapter
    recipe: Recipe
    parents: list[dict[str, Any]]
    path: Path | None = None
    pushed: PushResult | None = None
    recipe_path: Path | None = None

    @property
    def truncation(self) -> dict[str, Any] | None:
        """Worst and mean relative Frobenius error of the truncated modules (None if exact)."""
        errors = (self.adapter.extra.get("blend") or {}).get("relative_error") or {}
        if not errors:
            return None
        worst = max(errors, key=errors.get)
        return {"max": errors[worst], "module": worst, "mean": sum(errors.values()) / len(errors),
                "modules": len(errors)}


def _method_options(method: str, options: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Options checked against the method table; the seed is split off (recipes keep it apart)."""
    from adapterhub.compose.blend import METHODS

    if method not in METHODS:
        raise BlendOptionError(f"unknown blend method {method!r}; choose one of: {', '.join(sorted(METHODS))}.\n"
                               "  fix: pick one of them (the README's blend table says what each does).")
    options = METHODS[method].validate(dict(options))
    seed = options.pop("seed", None)
    return options, seed


def blend_sources(sources: Sequence[str] = (), weights: Sequence[float] | None = None, method: str = "linear",
                  options: dict[str, Any] | None = None, *, recipe: str | Path | Recipe | None = None,
                  registry: Any = None, allow_pickle: bool = False, output: str | Path | None = None,
                  format: str = "peft", overwrite: bool = False, push: str | None = None,
                  save_recipe: str | Path | None = None) -> BlendOutcome:
    """Blend ``sources`` (directories or registry references) or exactly what ``recipe`` says, and
    write the result to ``output`` and/or push it as ``push`` with its lineage; ``save_recipe``
    writes the recipe. ``overwrite`` lets both replace what exists.

    Every output is checked before any source is read or blended: a refused ``output`` or
    ``save_recipe`` (missing folder, read-only place, a source, the registry) costs nothing.

    Raises:
        BlendOptionError: unknown method, an option the method does not take, or a bad value.
        BlendError, RecipeError, CompatibilityError: the inputs cannot be blended as asked.
        OutputPathError, FormatError, StorageError: an output cannot be written (nothing was).
    """
    from adapterhub.compose.blend import blend
    from adapterhub.formats import write_adapter
    from adapterhub.formats._files import check_directory_target

    if (recipe is None) == (not sources):
        raise BlendError("give sources or a recipe (exactly one of them).\n  fix: pass sources=[...] or recipe=PATH, "
                         "not both.")
    if output is None and push is None:
        raise BlendError("a blend needs somewhere to go: an output directory or a registry name to push to.\n"
                         "  fix: pass output=DIR or push=NAME (CLI: -o DIR or --push NAME).")
    if recipe is None:
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise BlendError(f"{len(weights)} weight(s) for {len(sources)} source(s).\n  fix: give one weight per "
                             "source.")
        if not all(math.isfinite(w) for w in weights):
            raise BlendError(f"weights must be finite numbers, not {weights}.\n  fix: give numbers such as 0.7,0.3 "
                             "(a negative weight negates a task).")
        opts, seed = _method_options(method, options or {})
        paths = [Path(s).expanduser() for s in sources if looks_like_path(s)]
    else:
        if options or weights is not None:
            raise BlendError("a recipe fixes weights, method and options; do not give them as well.")
        recipe_path = None if isinstance(recipe, Recipe) else Path(recipe)
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
        paths = [Path(s["path"]) for s in recipe.sources if "path" in s] + ([recipe_path] if recipe_path else [])
    if push is not None:
        from adapterhub.registry.refs import check_target

        check_target(push)
    with ExitStack() as stack:
        stack.enter_context(reading(*paths))
        if output is not None:
            check_directory_target(output, overwrite=overwrite)
            probe_directory(output)
        commit_recipe = None
        if save_recipe is not None:
            commit_recipe = stack.enter_context(pending_text_file(save_recipe, what="recipe", overwrite=overwrite))
        reg = _Registry(registry)
        if recipe is None:
            opened = [_open(s, reg, allow_pickle=allow_pickle) for s in sources]
            recipe = Recipe([s.pin for s in opened], list(weights), method, opts, seed)
            seeded = {"seed": seed} if seed is not None else {}
            result = blend([s.adapter for s in opened], weights, method, labels=list(sources), **opts, **seeded)
        else:
            refs = [s["ref"] for s in recipe.sources if "ref" in s]
            result = run_recipe(recipe, reg.get(refs[0]) if refs else None, allow_pickle=allow_pickle)
        parents = [{"ref": s.get("ref") or s["path"], "digest": s["digest"], "weight": w}
                   for s, w in zip(recipe.sources, recipe.weights, strict=True)]
        outcome = BlendOutcome(result, recipe, parents)
        if output is not None:
            outcome.path = write_adapter(result, output, format=format, overwrite=overwrite)
        if push is not None:
            outcome.pushed = reg.get(push).push(result, push, parents=parents, recipe=recipe.to_dict(),
                                                description=f"{recipe.method} blend of {len(parents)} adapters")
        if commit_recipe is not None:
            outcome.recipe_path = commit_recipe(recipe.text())
    return outcome


# --- export ----------------------------------------------------------------------------------------


def export_sources(sources: Sequence[str], base: str | Path, out: str | Path, *, method: str | None = None,
                   options: dict[str, Any] | None = None, registry: Any = None, allow_pickle: bool = False,
                   overwrite: bool = False, **export: Any) -> ExportResult:
    """Fold ``sources`` (``SRC[=WEIGHT]``: directories, registry references, recipe files) into the
    base at ``base`` and write the checkpoint to ``out``; with ``method``, blend them first.

    The provenance recorded in every shard and the model card pins each source by digest.
    ``export`` goes to :func:`adapterhub.export.export_merged` (``max_shard_size``, ``dtype``,
    ``keep_unmerged``, ``direct_io``).

    Raises:
        BlendOptionError: options without a method, or ones the method does not take.
        OutputPathError: ``out`` is, contains or lies inside the base, a source, the registry or the
            current directory (checked before anything is read).
        ExportError, MergeError, CompatibilityError, BaseCheckpointError, StorageError: as export_merged.
    """
    from adapterhub.compose.blend import blend
    from adapterhub.export import export_merged, import_torch_in_background
    from adapterhub.formats._files import check_directory_target

    import_torch_in_background()  # needed only to fold: reading and hashing the sources overlap the import
    parsed = [parse_weighted(s) for s in sources]
    specs, weights = [s for s, _ in parsed], [w for _, w in parsed]
    options = dict(options or {})
    if method is None and options:
        raise BlendOptionError(
            f"option(s) {', '.join(sorted(options))} given without a blend method; they only apply to a blend.\n"
            "  fix: pass a method (CLI: --method svd, ties, ...), or drop them (without a method every source is "
            "folded with its weight).")
    if method is not None:
        options, seed = _method_options(method, options)
        if seed is not None:
            options["seed"] = seed
    paths = [Path(s).expanduser() for s in specs if looks_like_path(s)]
    for path in [p for p in paths if p.is_file()]:  # a recipe: the directories it blends are sources too
        paths += [Path(s["path"]) for s in Recipe.load(path).sources if "path" in s]
    with ExitStack() as stack:
        stack.enter_context(reading(base, role="the base model this command reads"))
        stack.enter_context(reading(*paths))
        check_directory_target(out, overwrite=overwrite)
        reg = _Registry(registry)
        opened = [_open(s, reg, allow_pickle=allow_pickle, recipes=True) for s in specs]
        adapters = [s.adapter for s in opened]
        provenance_sources = [{**s.pin, "weight": w} for s, w in zip(opened, weights, strict=True)]
        if method is not None:
            adapters = [blend(adapters, weights, method, labels=specs, **options)]
            weights = [1.0]
        provenance = {"sources": provenance_sources, "method": method or "stack", "options": options}
        return export_merged(base, adapters, out, weights=weights, provenance=provenance, overwrite=overwrite,
                             **export)
