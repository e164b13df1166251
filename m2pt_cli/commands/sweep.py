"""``m2pt sweep`` and ``m2pt plot``: the paper's ablations as commands."""

from __future__ import annotations

import time
from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.errors import QUOTE_CHARS, one_line
from m2pt_cli.trust import trust_remote_code_option


@click.command()
@trust_remote_code_option
@click.argument("recipe", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--grid", "grid", multiple=True, help="KEY=V1,V2,... ; repeat for more keys (every combination).")
@click.option(
    "--cell", "extra_cells", multiple=True, help="One more cell: 'KEY=V KEY=V ...' (repeatable), after the grid's."
)
@click.option("--bench", "benches", multiple=True, help="Bench evaluated after each cell (repeatable).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Default: sweeps/<recipe>-<time>.")
@click.option("--resume", is_flag=True, help="Skip cells already finished in --output-dir.")
@click.option("--print-commands", is_flag=True, help="Print one shell command per cell instead of running them.")
@device_option
def sweep(recipe, overrides, grid, extra_cells, benches, output_dir, resume, print_commands, device) -> None:
    """Train and evaluate RECIPE (a YAML file or a bundled recipe's name) for every cell of the grid
    and every --cell; one table (CSV and JSON) for all.

    \b
    Examples:
      m2pt sweep recipes/demo.yaml --grid prompts.text.length=0,4 --grid prompts.vision.length=0,4 --bench demo
      m2pt sweep recipes/llava.yaml --grid method=m2pt,lora,full --bench mme --print-commands > jobs.sh
      m2pt sweep recipes/demo.yaml --grid prompts.vision.layers=0-0,0-1,all --output-dir sweeps/depth --resume
      m2pt sweep smol --grid prompts.text.length=0,4 --cell method=lora --cell "method=full train.learning_rate=2e-5"
    """
    from m2pt_cli import config, devices
    from m2pt_cli import sweep as sweeps
    from m2pt_cli.errors import UserError
    from m2pt_cli.logs import setup
    from m2pt_cli.recipes import resolve

    setup()
    if not grid and not extra_cells:
        raise UserError("m2pt sweep: give at least one --grid KEY=V1,V2 or --cell 'KEY=V ...'")
    parsed, extra = sweeps.parse_grid(grid), sweeps.parse_cells(extra_cells)
    sweeps.cells(parsed, extra)  # a cell given twice fails before anything runs
    name = config.load(recipe, overrides).name
    out = Path(output_dir) if output_dir else Path("sweeps") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if print_commands:
        click.echo("\n".join(sweeps.commands(recipe, parsed, benches, out, overrides, extra)))
        return
    device = devices.resolve(device)
    rows = sweeps.run(resolve(recipe), parsed, benches, out, resume, overrides, device=device, extra=extra)
    failed = [r for r in rows if r.get("status") != "ok"]
    click.echo(f"sweep: {len(rows) - len(failed)} cells done, {len(failed)} failed; table: {out / 'table.csv'}")
    for row in failed:  # a resumed sweep's rows are read back from its cell files: printed escaped and bounded
        click.echo(f"  failed: {one_line(str(row['cell']), QUOTE_CHARS)}: {one_line(str(row.get('error')))}")


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--metric", help="Column of table.csv to plot (default: the first bench metric).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Default: FOLDER/plots.")
def plot(folder, metric, output_dir) -> None:
    """PNG figures of a sweep (heatmap over two grid keys, bars over one, training curves) or of a run.

    \b
    Examples:
      m2pt plot sweeps/demo-20261124-101500
      m2pt plot sweeps/lengths --metric mme/mme_perception_score
      m2pt plot runs/demo-20261124-101500
    """
    from m2pt_cli.plots import plot as make_plots

    for path in make_plots(Path(folder), metric, Path(output_dir) if output_dir else None):
        click.echo(str(path))


@click.command()
@trust_remote_code_option
@click.argument("adapter", type=click.Path(file_okay=False, exists=True))
@click.option("--image", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--prompt", required=True, help="The question asked about the image.")
@click.option("--layer", default=-1, show_default=True, help="Block index; -1 = the last block holding prompts.")
@click.option(
    "--output", type=click.Path(dir_okay=False), help="PNG path (a .json with the numbers is written beside)."
)
@device_option
def attention(adapter, image, prompt, layer, output, device) -> None:
    """Share of attention the vision encoder and the LLM pay to the prompts, per head.

    \b
    Examples:
      m2pt attention runs/demo-20261124-101500 --image digit.png --prompt "What digit is shown?"
      m2pt attention my-adapter --image cat.png --prompt "What is it?" --layer 10 --output cat-attention.png
    """
    from m2pt_cli import devices
    from m2pt_cli.attention import run

    output_path = Path(output) if output else None
    result, path = run(Path(adapter), Path(image), prompt, layer, output_path, devices.resolve(device))
    for tower in ("vision", "text"):
        share = result[tower]["prompt_share"]
        click.echo(
            f"{tower} layer {result[tower]['layer']}: attention on prompts per head "
            + " ".join(f"{s:.3f}" for s in share)
        )
    click.echo(f"figure: {path} (numbers: {path.with_suffix('.json')})")
