"""``m2pt recipes``: list the bundled recipes."""

from __future__ import annotations

import click


@click.command()
def recipes() -> None:
    """List the bundled recipes, one line each (path, backbone, model, what it is for).

    \b
    Example:
      m2pt recipes
    """
    from m2pt_cli.recipes import RECIPES_DIR, bundled, summarize

    rows = [summarize(path) for path in bundled()]
    root = RECIPES_DIR.parent
    paths = [str(r.path.relative_to(root)) for r in rows]
    columns = (paths, [r.backbone for r in rows], [r.model for r in rows])
    widths = [max(map(len, column), default=0) for column in columns]
    for path, r in zip(paths, rows, strict=True):
        click.echo(f"{path:<{widths[0]}}  {r.backbone:<{widths[1]}}  {r.model:<{widths[2]}}  {r.description}")
