"""``m2pt recipes``: list the bundled recipes."""

from __future__ import annotations

import click


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
    from m2pt_cli.recipes import bundled, folder, summarize

    rows = [summarize(path) for path in bundled()]
    names = [r.path.stem for r in rows]
    columns = (names, [r.backbone for r in rows], [r.model for r in rows])
    widths = [max(map(len, column), default=0) for column in columns]
    for name, r in zip(names, rows, strict=True):
        click.echo(f"{name:<{widths[0]}}  {r.backbone:<{widths[1]}}  {r.model:<{widths[2]}}  {r.description}")
    click.echo(f"(files in {folder()})")
