"""``m2pt bench``: what a training step costs per method, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.trust import trust_remote_code_option


@click.command()
@trust_remote_code_option
@click.argument("recipe", required=False, type=click.Path())
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
@click.option("--no-prompt-path", is_flag=True, help="Skip forward and decode with/without prompts.")
@click.option(
    "--eval-batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=2),
    help="Evaluation throughput: greedy samples/s at batch 1 and at this batch (m2pt eval's default).",
)
@click.option("--no-eval", is_flag=True, help="Skip the evaluation throughput.")
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="Also time each method under torch.compile (rows METHOD+compiled, the compiled / eager step-time "
    "ratio), and count the graph breaks of its forward, inside the layers and outside.",
)
@click.option(
    "--curve",
    "curves",
    multiple=True,
    metavar="AXIS=V1,V2,...",
    help="Instead of the methods: m2pt's step time and peak memory over prompt=TEXT_PROMPT_LENGTHS or "
    "seq=SEQUENCE_LENGTHS (repeatable), their slopes per added token, and a PNG beside --output.",
)
@click.option(
    "--suite",
    type=click.Choice(["gpu"]),
    help="Instead of RECIPE: check and measure this machine end to end (parity of kernels and dtypes, "
    "LLaVA-1.5-7B at full depth on CUDA, quantized bases, serving); tiny shapes on CPU. Needs --output.",
)
def bench(
    recipe,
    overrides,
    methods,
    steps,
    warmup,
    batch_size,
    seq_len,
    output,
    device,
    no_memory,
    no_prompt_path,
    eval_batch_size,
    no_eval,
    compile_,
    curves,
    suite,
) -> None:
    """Time training steps of each method on synthetic inputs of RECIPE's shapes (a YAML file or a
    bundled recipe's name).

    Reports median step time and spread, the ratio to m2pt, peak memory, trainable parameters,
    optimizer-state and adapter bytes. Two floors, every weight frozen: `floor` back-propagates to the
    inputs of both towers (what any method with visual prompts must do), `limit` to the LLM's input
    embeddings only (the floor of text prompts). Also forward time with/without prompts against the
    token ratio, decode tokens/s with/without prompts, and evaluation throughput: greedy samples/s
    through the evaluation path at batch 1 and at --eval-batch-size.

    \b
    Examples:
      m2pt bench recipes/bench-cpu.yaml
      m2pt bench bench-cpu --methods m2pt,lora
      m2pt bench recipes/bench-cpu.yaml --methods m2pt,floor --steps 50 --output bench.json
      m2pt bench demo --methods m2pt,lora --compile --no-memory
      m2pt bench bench-cpu --curve prompt=0,5,10,20,40 --curve seq=128,256,512,1024 --output curves.json
      m2pt bench --suite gpu --output gpu-suite.json
    """
    from m2pt_cli import devices
    from m2pt_cli.benchmark import markdown, run, write_report
    from m2pt_cli.errors import UserError
    from m2pt_cli.recipes import resolve

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    device = devices.resolve(device)
    if suite:
        _suite(recipe, overrides, output, device)
        return
    if recipe is None:
        raise UserError("give a RECIPE (a YAML file or a bundled recipe's name), or --suite gpu")
    if curves and compile_:
        raise UserError("--compile times the methods; it does not combine with --curve")
    if curves:
        _curves(
            resolve(recipe), curves, tuple(overrides), steps, warmup, batch_size, seq_len, output, device, no_memory
        )
        return
    report = run(
        resolve(recipe),
        chosen,
        tuple(overrides),
        steps,
        warmup,
        batch_size,
        seq_len,
        device,
        memory=not no_memory,
        prompt_path=not no_prompt_path,
        eval_batch_size=None if no_eval else eval_batch_size,
        compile=compile_,
    )
    table = markdown(report)
    click.echo(table)
    if output:
        write_report(Path(output), report, table)
        click.echo(f"report: {output} and {Path(output).with_suffix('.md')}")
    else:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))


def _curves(recipe, specs, overrides, steps, warmup, batch_size, seq_len, output, device, no_memory) -> None:
    """``m2pt bench --curve``: every curve, one report, its table and its plot."""
    from m2pt_cli import config as recipe_config
    from m2pt_cli.benchmark import Shapes, curve, curves_markdown, curves_report, parse_curve, plot_curves, write_report
    from m2pt_cli.errors import UserError

    parsed = dict(parse_curve(spec) for spec in specs)  # bad specs fail before anything is loaded
    if len(parsed) != len(specs):
        raise UserError("--curve: each axis once (prompt, seq)")
    if not output:
        raise UserError("--curve: give --output FILE.json (the table and the plot are written beside it)")
    loaded = recipe_config.load(recipe, overrides)
    shapes = Shapes(batch_size or loaded.train.per_device_batch_size, seq_len or loaded.data.max_length)
    results = {
        axis: curve(recipe, axis, values, overrides, steps, warmup, shapes, device, memory=not no_memory)
        for axis, values in parsed.items()
    }
    report = curves_report(recipe, overrides, shapes, steps, warmup, device, results)
    table = curves_markdown(report)
    click.echo(table)
    write_report(Path(output), report, table)
    plot = plot_curves(report, Path(output).with_suffix(".png"))
    click.echo(f"report: {output}, {Path(output).with_suffix('.md')} and {plot}")


def _suite(recipe, overrides, output, device) -> None:
    """``m2pt bench --suite gpu``: every step, one report and its table; exit 1 when a check failed."""
    import sys

    from click.core import ParameterSource

    from m2pt_cli.benchmark.report import write_report
    from m2pt_cli.benchmark.suite import run_suite, suite_markdown
    from m2pt_cli.errors import UserError

    if recipe is not None:
        raise UserError(f"--suite chooses its own recipes; leave out RECIPE ({recipe})")
    context = click.get_current_context()
    kept = {"suite", "output", "device", "trust_remote_code", "recipe", "overrides"}
    given = [
        param.opts[0]
        for param in context.command.params
        if param.name not in kept and context.get_parameter_source(param.name) is not ParameterSource.DEFAULT
    ]
    if given or overrides:
        raise UserError(f"--suite runs its own plan; leave out {(given or list(overrides))[0]} (it takes --device)")
    if not output:
        raise UserError("--suite: give --output FILE.json (the table is written beside it)")
    report = run_suite(
        device,
        lambda line: click.echo(line, err=True),
        lambda partial: write_report(Path(output), partial, suite_markdown(partial)),
    )
    table = suite_markdown(report)
    click.echo(table)
    click.echo(f"report: {output} and {Path(output).with_suffix('.md')}")
    if report["failed"]:
        click.echo(
            f"m2pt: the suite found {len(report['failed'])} failure(s): " + "; ".join(report["failed"]), err=True
        )
        sys.exit(1)
