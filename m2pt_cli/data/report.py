"""What ``m2pt data`` reports: a recipe's data prepared (and cached) as training would, without weights."""

from __future__ import annotations

import time
from typing import Any

from m2pt_cli.config import GROUP_BY, Recipe
from m2pt_cli.data.build import prepare
from m2pt_cli.data.grouping import lengths_and_images, padding_saved
from m2pt_cli.loading import load_processor
from m2pt_cli.registry import BACKBONES


def padding_by_order(train, recipe: Recipe) -> dict[str, int]:
    """Tokens of one epoch, and the pad tokens its batches hold in each ``data.group_by`` order
    (per-device batches; megabatches of one optimizer step on one process)."""
    lengths, images = lengths_and_images(train)
    per_device = recipe.train.per_device_batch_size
    per_step = recipe.train.global_batch_size // per_device
    padding = {"tokens": int(lengths.sum())}
    for mode in GROUP_BY:
        padding[mode] = padding_saved(lengths, images, per_device, mode, recipe.seed, per_step)[1]
    return padding


def prepare_report(recipe: Recipe) -> dict[str, Any]:
    """Prepare ``recipe``'s data and describe it (``lines`` for the terminal, the rest for JSON)."""
    started = time.monotonic()
    backbone = BACKBONES.get(recipe.model.backbone)
    processor = load_processor(recipe)
    train, held_out, report = prepare(recipe.data, processor, backbone, recipe.model.chat_template, recipe.seed)
    padding = padding_by_order(train, recipe)
    lines = report.lines()
    tokens, batch = padding["tokens"], recipe.train.per_device_batch_size
    for mode in GROUP_BY:
        pad = padding[mode]
        chosen = " (this recipe's data.group_by)" if mode == recipe.data.group_by else ""
        lines.append(
            f"data: padding in batches of {batch}, group_by {mode}: {pad:,} pad tokens "
            f"({100 * pad / max(tokens + pad, 1):.1f} % of the batches){chosen}"
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
