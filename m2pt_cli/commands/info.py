"""``m2pt info``: what a recipe builds, without loading weights."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("recipe", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
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
    """
    from m2pt_cli import config
    from m2pt_cli.info import describe, format_report

    report = describe(config.load(recipe, overrides))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
