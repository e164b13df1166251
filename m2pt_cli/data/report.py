"""What ``m2pt data`` reports: a recipe's data prepared (and cached) as training would, without weights."""

from __future__ import annotations

import time
from typing import Any

from m2pt_cli.config import Recipe
from m2pt_cli.data.build import prepare
from m2pt_cli.data.padding import padded_tokens
from m2pt_cli.loading import load_processor
from m2pt_cli.registry import BACKBONES


def prepare_report(recipe: Recipe) -> dict[str, Any]:
    """Prepare ``recipe``'s data and describe it (``lines`` for the terminal, the rest for JSON)."""
    started = time.monotonic()
    backbone = BACKBONES.get(recipe.model.backbone)
    processor = load_processor(recipe)
    train, held_out, report = prepare(recipe.data, processor, backbone, recipe.model.chat_template, recipe.seed)
    batch = recipe.train.per_device_batch_size
    padding = padded_tokens(train, batch, recipe.seed)
    lines = report.lines()
    lines.append(
        f"data: padding in batches of {batch}: {padding['padding']:,} of {padding['tokens']:,} tokens "
        f"({100 * padding['padding'] / max(padding['tokens'], 1):.1f} %)"
    )
    lines += [f"cache: {line}" for line in report.cache]
    seconds = time.monotonic() - started
    lines.append(f"data: prepared in {seconds:.1f} s (encoding and cache {report.seconds:.1f} s)")
    return {
        "records": report.records,
        "kept": report.kept,
        "skipped": report.skipped,
        "skipped_ids": report.skipped_ids,
        "truncated": report.truncated,
        "train": report.train,
        "held_out": report.held_out,
        "tokens_per_record": report.tokens,
        "padding": padding,
        "cache": report.cache,
        "seconds": round(seconds, 2),
        "lines": lines,
    }
