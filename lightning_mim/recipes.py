"""Shipped recipes by name, so ``--config`` of a recipe works from any folder once the package is installed.

The repository's ``experiments/`` folder is installed as the package ``lightning_mim.experiments``
(setup.py maps it; the files exist once). ``--config X`` is read as a path first. When no file
``X`` exists, ``X`` is looked up among the shipped recipes, with or without the leading
``experiments/`` and the ``.yaml`` suffix: ``mae``, ``smit.yaml``, ``experiments/mae.yaml``,
``trainer/gpu.yaml``, ``study/demo.yaml``. A checkout that is not installed (``PYTHONPATH``)
finds them in ``./experiments`` when run from the repository root.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import urllib.parse
from pathlib import Path, PurePosixPath

DISTRIBUTION = "lightning-mim"
RECIPES_PACKAGE = "lightning_mim.experiments"
CHECKOUT_FOLDER = "experiments"
CONFIG_FLAGS = ("--config", "-c")


class RecipeNotFound(ValueError):
    """``--config`` names neither an existing file nor a shipped recipe."""


def recipe_folders() -> list[Path]:
    """Where shipped recipes live: the installed package, the checkout of an editable install
    (``pip install -e .``: its import hook cannot expose a folder-only package), then ``./experiments``."""
    spec = importlib.util.find_spec(RECIPES_PACKAGE)
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    source = editable_checkout()
    if source is not None and (source / CHECKOUT_FOLDER).is_dir():
        folders.append(source / CHECKOUT_FOLDER)
    if Path(CHECKOUT_FOLDER).is_dir():
        folders.append(Path(CHECKOUT_FOLDER))
    return folders


def editable_checkout() -> Path | None:
    """The source folder of an editable install, from its PEP 610 ``direct_url.json``; None otherwise."""
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    info = json.loads(text) if text else {}
    url = urllib.parse.urlparse(info.get("url", ""))
    if not info.get("dir_info", {}).get("editable") or url.scheme != "file":
        return None
    return Path(urllib.parse.unquote(url.path))


def shipped_recipes() -> list[str]:
    """Names of the shipped YAML files, relative to the recipes folder (``mae.yaml``, ``trainer/gpu.yaml``)."""
    names = {path.relative_to(folder).as_posix() for folder in recipe_folders() for path in folder.rglob("*.yaml")}
    return sorted(names)


def find_recipe(name: str) -> Path:
    """The file ``name`` refers to: itself if it exists, else the shipped recipe of that name."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.parts[:1] == (CHECKOUT_FOLDER,):
        relative = PurePosixPath(*relative.parts[1:])
    if not path.is_absolute() and relative.name:
        candidates = [relative] if relative.suffix else [relative.with_suffix(".yaml"), relative]
        for folder in recipe_folders():
            for candidate in candidates:
                if (folder / candidate).is_file():
                    return folder / candidate
    shipped = ", ".join(shipped_recipes()) or "none found (is the package installed?)"
    raise RecipeNotFound(f"--config {name}: no such file, and no shipped recipe of that name. "
                         f"Give a path to a YAML file or one of: {shipped}")


def resolve_config_arguments(words: list[str]) -> list[str]:
    """``words`` with every ``--config``/``-c`` value that is not a file replaced by its shipped recipe."""
    resolved = list(words)
    for index, word in enumerate(resolved):
        if word in CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = _resolve_value(resolved[index + 1])
        elif word.startswith("--config="):
            resolved[index] = "--config=" + _resolve_value(word.split("=", 1)[1])
    return resolved


def _resolve_value(value: str) -> str:
    if value.lstrip().startswith(("{", "[")) or "\n" in value:  # jsonargparse also takes inline YAML/JSON
        return value
    return str(find_recipe(value))
