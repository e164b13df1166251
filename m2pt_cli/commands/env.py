"""``m2pt env``: the versions, devices and caches a bug report needs."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def env(as_json: bool) -> None:
    """Print m2pt's, Python's and the key packages' versions, torch's CUDA/cuDNN build, the
    devices with their memory, bf16 support, the cache folders and the environment variables
    m2pt reads. Paste it into a bug report.

    \b
    Examples:
      m2pt env
      m2pt env --json
    """
    from m2pt_cli.environment import collect, format_report

    report = collect()
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
