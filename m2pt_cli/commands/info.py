"""``m2pt info``: what a recipe builds, without loading weights."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("recipe", type=click.Path(), required=False)
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--keys", is_flag=True, help="List every recipe key (type, default, allowed values, meaning) instead; no RECIPE."
)
def info(recipe: str | None, overrides: tuple[str, ...], as_json: bool, keys: bool) -> None:
    """Show backbone, towers, prompt layers and trainable parameters of RECIPE (a YAML file or
    the name of a bundled recipe).

    The model keys the backbone reads besides the common ones (its own, such as openclip_vicuna's
    vision_tower) are listed under the model with their values.

    OVERRIDES are KEY=VALUE pairs applied on top of the recipe. The model is built on the meta
    device from its config, so no weights are downloaded (a hub id still needs its config.json).

    \b
    Examples:
      m2pt info recipes/demo.yaml
      m2pt info demo
      m2pt info recipes/llava.yaml prompts.text.length=20 prompts.vision.layers=0-11
      m2pt info --keys
    """
    if keys:
        if recipe is not None:
            raise click.UsageError("--keys lists every recipe key; it takes no RECIPE")
        from m2pt_cli.recipe_reference import terminal
        from m2pt_cli.registry import BACKBONES

        click.echo(terminal(BACKBONES.names()))
        return
    if recipe is None:
        raise click.UsageError(
            "Missing argument 'RECIPE' (a YAML file or a bundled recipe's name; m2pt recipes lists them)"
        )
    from m2pt_cli import config
    from m2pt_cli.info import describe, format_report

    report = describe(config.load(recipe, overrides))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
