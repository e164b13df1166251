"""``m2pt data``: prepare a recipe's training data (check, encode, cache) and report it, without training."""

from __future__ import annotations

import json

import click

from m2pt_cli.trust import trust_remote_code_option


@click.command()
@trust_remote_code_option
@click.argument("recipe", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def data(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check, encode and cache RECIPE's training data as `m2pt train` would, and report it: records
    kept and skipped per reason, tokens per record, padding per batch, time, cache folders.

    Only the processor is loaded, never the weights. The next `m2pt train` of the same data (any
    run, any rank) reads the cache ($M2PT_CACHE/data, default ~/.cache/m2pt/data) instead of
    encoding again.

    \b
    Examples:
      m2pt data demo
      m2pt data recipes/llava.yaml data.num_proc=16
    """
    from m2pt_cli import config
    from m2pt_cli.data.report import prepare_report

    cfg = config.load(recipe, overrides)
    report = prepare_report(cfg)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for line in report["lines"]:
        click.echo(line)
