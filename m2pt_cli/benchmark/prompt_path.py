"""What the prompts cost on the forward and decode paths, against the same model without them."""

from __future__ import annotations

import statistics
from pathlib import Path

from m2pt_cli import config as recipe_config
from m2pt_cli.benchmark.methods import METHOD_OVERRIDES, Shapes
from m2pt_cli.benchmark.timing import decode_tokens_per_second, forward_seconds

DECODE_TOKENS = 32  # new tokens per timed generate (the prefill is timed apart and left out)


def measure_prompt_path(
    model, recipe_path: Path, overrides: tuple[str, ...], batch, shapes: Shapes, device: str
) -> dict:
    """Forward and decode cost of the prompts against the same model without them."""
    from m2pt_cli.loading import build

    plain_recipe = recipe_config.load(recipe_path, tuple(overrides) + METHOD_OVERRIDES["limit"][:2])
    plain, _ = build(plain_recipe, device=device)
    model.eval()
    plain.eval()
    forward_seconds(model, batch, 2, device)
    seen: list[int] = []  # the vision encoder's sequence length without prompts (patches + CLS)
    first_block = plain.backbone.vision_tower(plain.base).blocks[0]
    handle = first_block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    forward_seconds(plain, batch, 2, device)
    handle.remove()
    with_prompts, without = [], []
    for _ in range(5):  # interleaved
        with_prompts.append(forward_seconds(model, batch, 1, device))
        without.append(forward_seconds(plain, batch, 1, device))
    cfg = model.m2pt_config
    n_image = seen[0]
    vision_cost = lambda extra: sum(  # noqa: E731 - tokens x width^2 per block
        (n_image + (extra if i in cfg.vision_layers else 0)) * cfg.vision_width**2
        for i in range(cfg.vision_total_layers)
    )
    text_prefix = cfg.text_length if cfg.text_layers else 0
    text_cost = lambda extra: (shapes.seq_len + extra) * cfg.text_width**2 * cfg.text_total_layers  # noqa: E731
    token_ratio = (vision_cost(cfg.vision_length) + text_cost(text_prefix)) / (vision_cost(0) + text_cost(0))
    rates = decode_tokens_per_second({"with": model, "without": plain}, batch, DECODE_TOKENS, 5, device)
    decode_with, decode_without = rates["with"], rates["without"]
    forward_ratio = statistics.median(with_prompts) / statistics.median(without)
    return {
        "forward_ratio": forward_ratio,
        "token_ratio": token_ratio,
        "forward_overhead_over_token_ratio": forward_ratio / token_ratio,
        "decode_tokens_per_second_with_prompts": decode_with,
        "decode_tokens_per_second_without_prompts": decode_without,
        "decode_ratio": decode_with / decode_without,
    }
