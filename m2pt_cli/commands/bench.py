"""``m2pt bench``: what a training step costs per method, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.trust import trust_remote_code_option


@click.command()
@trust_remote_code_option
@click.argument("recipe", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option(
    "--methods",
    default="m2pt,lora,full,vision-only,text-only,floor,limit",
    show_default=True,
    help="Comma-separated: m2pt, lora, full, vision-only, text-only, floor, limit.",
)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Timed steps per method.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--batch-size", type=click.IntRange(min=1), help="Default: train.per_device_batch_size.")
@click.option("--seq-len", type=click.IntRange(min=8), help="Default: data.max_length.")
@click.option("--output", type=click.Path(dir_okay=False), help="JSON report (a .md table is written beside it).")
@device_option
@click.option("--no-memory", is_flag=True, help="Skip the per-method peak-memory child processes.")
def bench(recipe, overrides, methods, steps, warmup, batch_size, seq_len, output, device, no_memory) -> None:
    """Time training steps of each method on synthetic inputs of RECIPE's shapes (a YAML file or a
    bundled recipe's name).

    Reports median step time and spread, the ratio to m2pt, peak memory, trainable parameters,
    optimizer-state and adapter bytes. Two floors, every weight frozen: `floor` back-propagates to the
    inputs of both towers (what any method with visual prompts must do), `limit` to the LLM's input
    embeddings only (the floor of text prompts). Also forward time with/without prompts against the
    token ratio, and decode tokens/s with/without prompts.

    \b
    Examples:
      m2pt bench recipes/bench-cpu.yaml
      m2pt bench bench-cpu --methods m2pt,lora
      m2pt bench recipes/bench-cpu.yaml --methods m2pt,floor --steps 50 --output bench.json
    """
    from m2pt_cli import devices
    from m2pt_cli.benchmark import markdown, run, write_report
    from m2pt_cli.recipes import resolve

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    device = devices.resolve(device)
    report = run(
        resolve(recipe), chosen, tuple(overrides), steps, warmup, batch_size, seq_len, device, memory=not no_memory
    )
    table = markdown(report)
    click.echo(table)
    if output:
        write_report(Path(output), report, table)
        click.echo(f"report: {output} and {Path(output).with_suffix('.md')}")
    else:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
