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
    width = max((len(str(r.path.relative_to(root))) for r in rows), default=0)
    for r in rows:
        click.echo(f"{str(r.path.relative_to(root)):<{width}}  {r.backbone:<12} {r.model:<36} {r.description}")
