"""``m2pt chat``: talk with an adapter about an image in the terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.trust import trust_remote_code_option


def _lines() -> Iterator[str]:
    """Input lines: read with a prompt (and line editing) at a terminal, else as they come (bytes
    that are not UTF-8 kept as surrogates, so that the session can say which line it skips)."""
    if not sys.stdin.isatty():
        raw = getattr(sys.stdin, "buffer", None)
        if raw is None:
            yield from sys.stdin
            return
        for line in raw:
            yield line.decode("utf-8", errors="surrogateescape")
        return
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except EOFError:
            click.echo()
            return


@click.command()
@trust_remote_code_option
@click.argument("adapter", required=False, type=click.Path(file_okay=False))
@click.option("--image", type=click.Path(dir_okay=False, exists=True), help="The image to talk about.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(min=1),
    help="Longest prompt asked, chat template and image tokens included (default: the recipe's data.max_length).",
)
@click.option("--base-model", help="Hub id or folder of the base weights (default: the adapter's).")
@device_option
def chat(
    adapter: str | None,
    image: str | None,
    max_new_tokens: int,
    max_prompt_tokens: int | None,
    base_model: str | None,
    device: str | None,
):
    """Talk with ADAPTER (default: the newest run in ./runs) about an image, answers streamed.

    Each line is a question, asked with the conversation so far (through the chat template, as in
    training). /image FILE starts a new conversation about FILE, /reset forgets the history,
    Ctrl-D (end of input) quits. Answers go to stdout, one line each; notes go to stderr. A line
    that cannot be asked (not UTF-8, over --max-prompt-tokens, a bad /image) gets one note and the
    chat goes on.

    \b
    Examples:
      m2pt chat runs/demo-20261124-101500 --image digit.png
      printf 'What digit is shown?\\nAre you sure?\\n' | m2pt chat my-adapter --image digit.png
    """
    from m2pt_cli import devices, runs
    from m2pt_cli.data.images import DEFAULT_MAX_PIXELS
    from m2pt_cli.model_source import resolve_model_source
    from m2pt_cli.serving.engine import Engine
    from m2pt_cli.serving.terminal import HELP, Session, open_picture

    source = resolve_model_source(Path(adapter) if adapter else runs.latest_run(), base=base_model)
    if image:
        open_picture(image, DEFAULT_MAX_PIXELS)  # a bad image is refused before the model loads
    loaded = source.load(device=devices.resolve(device))
    engine = Engine(loaded, max_batch_size=1, queue_size=1).start()
    try:
        session = Session(engine, image, max_new_tokens, sys.stdout, sys.stderr, max_prompt_tokens)
        if sys.stdin.isatty():
            session.note(HELP)
        session.run(_lines())
    finally:
        engine.stop()
