"""The recipes bundled with m2pt: the repository's ``recipes/`` folder, installed as the package
``m2pt_cli.bundled_recipes`` with the files the recipes name (the demo's tiny model), and read
through ``importlib.resources`` so an installed wheel never looks for the checkout."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from m2pt_cli.errors import UserError, did_you_mean

PACKAGE = "m2pt_cli.bundled_recipes"


def folder() -> Path:
    """The folder of the bundled recipes (a checkout's ``recipes/``, or inside the installed package)."""
    root = resources.files(PACKAGE)
    if not isinstance(root, Path):  # a zip import: recipes name folders beside them (./demo/model)
        raise UserError(f"the bundled recipes are not plain files here ({root}); install m2pt unpacked (pip install)")
    return root


def bundled() -> list[Path]:
    """Paths of the bundled recipe files, sorted."""
    return sorted(folder().glob("*.yaml"))


def display_name(path: str | Path) -> str:
    """How to name a recipe file on a command line: a bundled recipe by its name, others by path."""
    path = Path(path)
    try:
        if path.resolve().parent == folder().resolve():
            return path.stem
    except UserError:
        pass
    return str(path)


def resolve(recipe: str | Path) -> Path:
    """The recipe file a command names: an existing file, else a bundled recipe named without a folder
    (``demo`` or ``demo.yaml``). Anything else is a one-line error suggesting the nearest bundled name."""
    path = Path(recipe)
    if path.is_file():
        return path
    text = str(recipe)
    names = [p.stem for p in bundled()]
    stem = text[: -len(".yaml")] if text.endswith(".yaml") else text
    if stem in names and not any(sep and sep in text for sep in (os.sep, os.altsep, "/")):
        return folder() / f"{stem}.yaml"
    if path.exists():  # a folder or a special file: reading it says what it is
        return path
    raise UserError(
        f"{text}: no such recipe file{did_you_mean(path.stem, names)} (m2pt recipes lists the bundled ones)"
    )
