"""``m2pt generate``: answer one image and prompt with an adapter (or the base model)."""

from __future__ import annotations

from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.trust import trust_remote_code_option


@click.command()
@trust_remote_code_option
@click.option(
    "--adapter",
    "adapter",
    type=click.Path(file_okay=False),
    help="Adapter, run or checkpoint folder (default: the newest run in ./runs).",
)
@click.option("--image", required=True, type=click.Path(dir_okay=False, exists=True), help="Image file.")
@click.option("--prompt", required=True, help="The question or instruction.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--base", "use_base", is_flag=True, help="Answer with the base model, without the adapter.")
@click.option("--base-model", help="Hub id or folder of the base weights (default: the adapter's).")
@device_option
def generate(
    adapter: str | None,
    image: str,
    prompt: str,
    max_new_tokens: int,
    use_base: bool,
    base_model: str | None,
    device: str | None,
) -> None:
    """Print the answer to PROMPT about IMAGE, greedy decoding.

    \b
    Examples:
      m2pt generate --adapter runs/demo-20261124-101500 --image digit.png --prompt "What digit is shown?"
      m2pt generate --adapter my-adapter --image cat.png --prompt "What is it?" --base
    """
    from m2pt_cli import devices, runs
    from m2pt_cli.errors import UserError
    from m2pt_cli.generation import answer

    if not Path(image).is_file():  # a device (/dev/zero), a pipe or a socket: never read as an image
        raise UserError(f"--image {image}: not a regular file (a device, pipe or socket); pass an image file")
    source = Path(adapter) if adapter else runs.latest_run()
    click.echo(answer(source, Path(image), prompt, max_new_tokens, use_base, base_model, devices.resolve(device)))
