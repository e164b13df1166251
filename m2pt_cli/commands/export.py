"""``m2pt export``: the trained adapter as a small, shareable folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option(
    "--format", "fmt", default="safetensors", show_default=True, help="safetensors or hf (with a model card)."
)
@click.option("--output", type=click.Path(file_okay=False), help="Folder to write (default: RUN_DIR/export-FORMAT).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Cast the tensors.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier m2pt export in --output (its files only).")
def export(run_dir: str | None, fmt: str, output: str | None, dtype: str | None, overwrite: bool) -> None:
    """Export the adapter of RUN_DIR (default: the newest run in ./runs).

    RUN_DIR may also be a checkpoint or an adapter folder. Only trained tensors are written
    (adapter.safetensors), with m2pt_adapter.json and the resolved recipe. The output folder must
    be new, empty, or hold an earlier m2pt export (replaced with --overwrite); m2pt never writes
    into a folder holding other files.

    \b
    Examples:
      m2pt export --format safetensors
      m2pt export runs/llava-20261124-101500 --format hf --dtype bfloat16 --output llava-m2pt
    """
    from m2pt_cli import runs
    from m2pt_cli.export import export as run_export

    source = Path(run_dir) if run_dir else runs.latest_run()
    folder = run_export(source, fmt, Path(output) if output else None, dtype, overwrite)
    size = (folder / "adapter.safetensors").stat().st_size
    click.echo(f"exported {source} -> {folder} ({size / 1024:.1f} KiB)")
