"""``m2pt serve``: an OpenAI-compatible HTTP server and a web page for one adapter."""

from __future__ import annotations

from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.trust import trust_remote_code_option


@click.command()
@trust_remote_code_option
@click.argument("adapter", required=False, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--api-key", envvar="M2PT_API_KEY", help="Require 'Authorization: Bearer KEY' (or $M2PT_API_KEY).")
@click.option("--allow-local-images", is_flag=True, help="Accept image_url file paths on the server's machine.")
@click.option("--max-image-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(min=1), help="Open requests at most.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1), help="Default max_tokens.")
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(min=1),
    help="Longest prompt accepted, chat template and image tokens included (default: the recipe's data.max_length).",
)
@click.option("--base-model", help="Hub id or folder of the base weights (default: the adapter's).")
@device_option
def serve(
    adapter: str | None,
    host: str,
    port: int,
    api_key: str | None,
    allow_local_images: bool,
    max_image_mb: float,
    max_batch_size: int,
    queue_size: int,
    max_new_tokens: int,
    max_prompt_tokens: int | None,
    base_model: str | None,
    device: str | None,
) -> None:
    """Serve ADAPTER (default: the newest run in ./runs) at http://HOST:PORT: POST
    /v1/chat/completions (OpenAI's API, greedy, streaming), GET /v1/models, GET /health and a web
    page at /. Concurrent requests are answered together in batches.

    \b
    Examples:
      m2pt serve runs/demo-20261124-101500
      m2pt serve my-adapter --port 8080 --api-key secret --max-image-mb 5
    """
    from m2pt_cli import devices, runs
    from m2pt_cli.serving.server import run_server

    source = Path(adapter) if adapter else runs.latest_run()
    run_server(
        source,
        host=host,
        port=port,
        api_key=api_key,
        allow_local_images=allow_local_images,
        max_image_mb=max_image_mb,
        max_batch_size=max_batch_size,
        queue_size=queue_size,
        max_new_tokens=max_new_tokens,
        base_model=base_model,
        device=devices.resolve(device),
        max_prompt_tokens=max_prompt_tokens,
    )
