"""``m2pt recipes``: list the bundled recipes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click


@dataclass
class RecipeSummary:
    path: Path
    name: str
    backbone: str
    model: str
    description: str


def summarize(path: Path) -> RecipeSummary:
    """Name, backbone, model and description of a recipe file (validated); a model shipped beside
    the bundled recipes is shown as the recipe writes it (``./demo/model``)."""
    from m2pt_cli import config
    from m2pt_cli.recipes import folder

    recipe = config.load(path)
    model, home = recipe.model.name_or_path, folder().resolve()
    if Path(model).is_absolute() and Path(model).is_relative_to(home):
        model = f"./{Path(model).relative_to(home).as_posix()}"
    return RecipeSummary(path, recipe.name, recipe.model.backbone, model, recipe.description)


@click.command()
def recipes() -> None:
    """List the bundled recipes, one line each (name, backbone, model, what it is for), then their folder.

    A bundled recipe is named by its name in any folder (m2pt train demo); a file of that name in
    the current folder wins. Copy one from the folder shown to edit it.

    \b
    Examples:
      m2pt recipes
      m2pt info demo
      m2pt train demo
    """
    from m2pt_cli.recipes import bundled, folder

    rows = [summarize(path) for path in bundled()]
    names = [r.path.stem for r in rows]
    columns = (names, [r.backbone for r in rows], [r.model for r in rows])
    widths = [max(map(len, column), default=0) for column in columns]
    for name, r in zip(names, rows, strict=True):
        click.echo(f"{name:<{widths[0]}}  {r.backbone:<{widths[1]}}  {r.model:<{widths[2]}}  {r.description}")
    click.echo(f"(files in {folder()})")
