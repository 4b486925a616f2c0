"""Blend recipes: sources + weights + method + options + seed, in a small JSON file that reproduces a
blend bit for bit. Sources from a registry are pinned by manifest digest; a pushed blend stores its
recipe and parents as lineage.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import BlendOptionError, RecipeError
from adapterhub.paths import shown

if TYPE_CHECKING:
    from adapterhub.adapter import Adapter
    from adapterhub.registry import Registry

RECIPE_SCHEMA = "adapterhub.recipe.v1"


@dataclass
class Recipe:
    """What a blend was made from and how."""

    sources: list[dict[str, str]]  # {"ref": "name@version", "digest": "sha256:..."} or {"path": "dir", "digest": ...}
    weights: list[float]
    method: str = "linear"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": RECIPE_SCHEMA, "sources": self.sources, "weights": self.weights, "method": self.method,
                "options": self.options, "seed": self.seed}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the recipe as JSON (atomically; the path is checked by the output guard first).

        Raises:
            OutputPathError: the folder is missing, ``path`` is a directory, a source or inside the registry,
                or it exists and ``overwrite`` is false.
            StorageError: the file system refused the write.
        """
        from adapterhub.paths import write_text_file

        return write_text_file(path, self.text(), what="recipe", overwrite=overwrite)

    def text(self) -> str:
        """The recipe as the JSON text :meth:`save` writes."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        """A recipe from its JSON document, checked: schema, sources, finite weights (one per source),
        and the method and options against the blend method table.

        Raises:
            RecipeError: a malformed document.
            BlendOptionError: an unknown method, or an option the method does not take or a bad value.
        """
        from adapterhub.compose.blend import METHODS, SEED

        fix = "\n  fix: pass a file written by `adapterhub blend --save-recipe` (or Recipe.save)."
        if data.get("recipe") != RECIPE_SCHEMA:
            raise RecipeError(f"{where}: not an {RECIPE_SCHEMA} document (\"recipe\": {data.get('recipe')!r}).{fix}")
        try:
            sources = [dict(s) for s in data["sources"]]
            weights = [float(w) for w in data["weights"]]
            recipe = cls(sources, weights, str(data.get("method", "linear")), dict(data.get("options") or {}),
                         data.get("seed"))
        except (KeyError, TypeError, ValueError) as e:
            raise RecipeError(f"{where}: invalid recipe ({e!r}); it needs sources, weights and method.{fix}") from e
        if not sources or any(not ({"ref", "path"} & s.keys()) for s in sources):
            raise RecipeError(f"{where}: every source needs a 'ref' (registry) or a 'path' (directory).{fix}")
        if len(weights) != len(sources) or not all(math.isfinite(w) for w in weights):
            raise RecipeError(f"{where}: needs one finite weight per source, has {weights} for {len(sources)} "
                              f"source(s).{fix}")
        if recipe.method not in METHODS:
            raise BlendOptionError(f"{where}: unknown blend method {recipe.method!r}; choose one of: "
                                   f"{', '.join(sorted(METHODS))}.{fix}")
        recipe.options = METHODS[recipe.method].validate(recipe.options)
        if recipe.seed is not None:
            recipe.seed = SEED.coerce(recipe.seed, recipe.method)
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read and check a recipe file (see :meth:`from_dict`).

        Raises:
            RecipeError: missing, unreadable, not JSON, nested too deeply, or not a recipe.
            BlendOptionError: an unknown method or a bad option.
        """
        path = Path(path)
        fix = "\n  fix: pass a file written by `adapterhub blend --save-recipe`."
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise RecipeError(f"recipe {shown(path)} does not exist.\n  fix: check the path.") from e
        except IsADirectoryError as e:
            raise RecipeError(f"recipe {shown(path)} is a directory; a recipe is a .json file.{fix}") from e
        except OSError as e:
            raise RecipeError(f"recipe {shown(path)} cannot be read: {e.strerror or e}.\n  fix: check the path and "
                              "its permissions.") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecipeError(f"recipe {shown(path)} is not valid JSON text ({e}).{fix}") from e
        except RecursionError as e:
            raise RecipeError(f"recipe {shown(path)} is nested too deeply to be a recipe.{fix}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {shown(path)} must hold a JSON object.{fix}")
        return cls.from_dict(data, str(path))


def directory_digest(path: Path) -> str:
    """A digest of a directory's files (names and contents), to pin a directory source."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(path).rglob("*") if q.is_file() and not q.name.startswith(".")):
        fh = hashlib.sha256(p.read_bytes()).hexdigest()
        h.update(f"{p.relative_to(path).as_posix()}\0{fh}\n".encode())
    return f"sha256:{h.hexdigest()}"


def run_recipe(recipe: Recipe, registry: Registry | None, *, allow_pickle: bool = False) -> Adapter:
    """Blend exactly what a recipe says; registry sources are loaded by their pinned digests."""
    from adapterhub.compose.blend import blend

    adapters = []
    for s in recipe.sources:
        if "ref" in s:
            if registry is None:
                raise RecipeError(f"source {s['ref']} of the recipe is a registry reference and no registry was "
                                  "given.\n  fix: pass the registry (CLI: --registry or ADAPTERHUB_REGISTRY).")
            name = s["ref"].partition("@")[0]
            ref = f"{name}@{s['digest']}" if s.get("digest") else s["ref"]
            adapters.append(registry.load(ref, allow_pickle=allow_pickle))
        else:
            from adapterhub.formats import read_adapter

            path = Path(s["path"])
            if not path.is_dir():
                raise RecipeError(f"source directory {shown(path)} of the recipe does not exist.\n  fix: restore it, "
                                  "or edit the recipe's path.")
            if s.get("digest") and directory_digest(path) != s["digest"]:
                raise RecipeError(f"source directory {shown(path)} changed since the recipe was written (digest "
                                  "differs).\n  fix: restore it, or blend from it again and save a new recipe.")
            adapters.append(read_adapter(path, allow_pickle=allow_pickle))
    from adapterhub.compose.blend import METHODS

    options = dict(recipe.options)
    if recipe.seed is not None and recipe.method in METHODS and "seed" in METHODS[recipe.method].option_names:
        options["seed"] = recipe.seed
    labels = [s.get("ref") or s["path"] for s in recipe.sources]
    return blend(adapters, recipe.weights, recipe.method, labels=labels, **options)
