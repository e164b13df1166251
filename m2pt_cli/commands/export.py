"""``m2pt export``: the trained adapter as a small, shareable folder."""

from __future__ import annotations

from pathlib import Path

import click

UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
DEFAULT_MAX_BYTES = "32GiB"  # m2pt_cli.export_bounds.MAX_ADAPTER_BYTES (not imported: --help stays light)


class ByteSize(click.ParamType):
    """A size in bytes: a whole number, optionally followed by KiB, MiB, GiB or TiB (``64GiB``)."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        number = text.rstrip("BKMGTi")
        unit = text[len(number) :]
        if not number.isdigit() or unit not in UNITS or int(number) <= 0:
            self.fail(f"{value!r} is not a size (a whole number of bytes, or with KiB, MiB, GiB or TiB: 64GiB)")
        return int(number) * UNITS[unit]


@click.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option(
    "--format", "fmt", default="safetensors", show_default=True, help="safetensors or hf (with a model card)."
)
@click.option("--output", type=click.Path(file_okay=False), help="Folder to write (default: RUN_DIR/export-FORMAT).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Cast the tensors.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier m2pt export in --output (its files only).")
@click.option(
    "--max-adapter-bytes",
    "max_bytes",
    type=ByteSize(),
    default=DEFAULT_MAX_BYTES,
    show_default=True,
    help="Refuse, before hashing it, an adapter whose tensors declare more (method=full on a 7B: ~14 GB).",
)
def export(
    run_dir: str | None, fmt: str, output: str | None, dtype: str | None, overwrite: bool, max_bytes: int
) -> None:
    """Export the adapter of RUN_DIR (default: the newest run in ./runs).

    RUN_DIR may also be a checkpoint or an adapter folder. Only trained tensors are written
    (adapter.safetensors), with m2pt_adapter.json and the resolved recipe. The output folder must
    be new, empty, or hold an earlier m2pt export (replaced with --overwrite); m2pt never writes
    into a folder holding other files.

    Before the tensor file is hashed, its header is checked: prompt shapes against its own
    m2pt_adapter.json, the declared total against --max-adapter-bytes, and the tensors against the
    base its recipe names when that base's config is here (a local folder or the hub cache; nothing
    is downloaded). Without it, the file is hashed with a progress bar.

    \b
    Examples:
      m2pt export --format safetensors
      m2pt export runs/llava-20261124-101500 --format hf --dtype bfloat16 --output llava-m2pt
    """
    from m2pt_cli import runs
    from m2pt_cli.export import export as run_export
    from m2pt_cli.logs import setup

    setup()  # the line saying why an adapter was not compared with its base

    source = Path(run_dir) if run_dir else runs.latest_run()
    folder = run_export(source, fmt, Path(output) if output else None, dtype, overwrite, max_bytes)
    size = (folder / "adapter.safetensors").stat().st_size
    click.echo(f"exported {source} -> {folder} ({size / 1024:.1f} KiB)")
