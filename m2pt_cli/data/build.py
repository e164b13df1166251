"""Recipe ``data`` section -> encoded train and held-out datasets, with bad records skipped or refused."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from m2pt_cli.chat import IMAGE_PLACEHOLDER
from m2pt_cli.data.encode import Encoder
from m2pt_cli.data.images import DEFAULT_MAX_PIXELS, image_problem
from m2pt_cli.data.sources import read_source
from m2pt_cli.errors import UserError, quote

log = logging.getLogger("m2pt")


@dataclass
class DataReport:
    """What preparing the data found."""

    records: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: list[str] = field(default_factory=list)
    truncated: int = 0
    train: int = 0
    held_out: int = 0

    def lines(self) -> list[str]:
        out = [f"data: {self.records} records, {self.kept} usable, {self.train} train, {self.held_out} held out"]
        if self.truncated:
            out.append(f"data: {self.truncated} samples truncated to max_length")
        for reason, count in sorted(self.skipped.items()):
            out.append(f"data: skipped {count} records: {reason}")
        if self.skipped_ids:
            out.append(f"data: first skipped ids: {', '.join(quote(i, bare=True) for i in self.skipped_ids[:5])}")
        return out


def _check_and_encode(row: dict[str, Any], encoder: Encoder, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    out = {"input_ids": [], "labels": [], "truncated": False, "problem": row.get("problem") or ""}
    if out["problem"]:
        return out
    turns = row["conversations"]
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    has_image = row["image"] is not None
    if not any(t["from"] in ("gpt", "assistant") for t in turns):
        out["problem"] = "no assistant reply"
    elif placeholders > (1 if has_image else 0):
        out["problem"] = "more <image> placeholders than images"
    elif has_image and placeholders == 0:
        out["problem"] = "an image but no <image> placeholder"
    else:
        out["problem"] = image_problem(row["image"], max_pixels)
    if out["problem"]:
        return out
    try:
        encoded = encoder.encode(turns, row["id"], has_image)
    except UserError as exc:
        out["problem"] = str(exc).split(": ", 1)[-1]
        return out
    if encoded is None:
        out["problem"] = "longer than max_length (the image or every reply would be cut)"
        return out
    out.update(input_ids=encoded.input_ids, labels=encoded.labels, truncated=encoded.truncated)
    return out


def prepare(data_cfg, processor: Any, backbone: Any, template: str, seed: int):
    """Read, check, encode, mix and split the recipe's sources.

    Returns:
        (train dataset, held-out dataset or None, DataReport). Datasets have columns ``id``,
        ``image`` ({bytes, path} or None), ``conversations``, ``input_ids``, ``labels``.
    Raises:
        UserError: a bad record under ``on_bad_record: error``, or no usable record at all.
    """
    import datasets

    encoder = Encoder(processor, backbone, template, data_cfg.max_length)
    report = DataReport()
    parts, weights = [], []
    if not data_cfg.sources:
        raise UserError("data.sources: the recipe names no training data")
    for i, source in enumerate(data_cfg.sources):
        key = f"data.sources[{i}]"
        raw = read_source(source, key)
        if len(raw) == 0:
            continue
        # one image feature for every format (undecoded {bytes, path} or None), so sources mix
        raw = raw.cast_column("image", datasets.Image(decode=False))
        checked = raw.map(
            lambda row: _check_and_encode(row, encoder, data_cfg.max_image_pixels), desc=f"{key} encoding"
        )
        report.records += len(checked)
        bad = checked.filter(lambda row: bool(row["problem"]))
        if len(bad):
            first = bad[0]
            if data_cfg.on_bad_record == "error":
                hint = "set data.on_bad_record: skip to skip such records"
                image = (first["image"] or {}).get("path")
                named = f" ({quote(image)})" if image else ""
                raise UserError(f"{key}: record {quote(first['id'], bare=True)}: {first['problem']}{named} ({hint})")
            for row in bad.select_columns(["id", "problem"]):
                report.skipped[row["problem"]] = report.skipped.get(row["problem"], 0) + 1
                if len(report.skipped_ids) < 5:
                    report.skipped_ids.append(row["id"])
        good = checked.filter(lambda row: not row["problem"])
        report.truncated += sum(good["truncated"])
        parts.append(good.select_columns(["id", "image", "conversations", "input_ids", "labels"]))
        weights.append(source.weight)
    report.kept = sum(len(p) for p in parts)
    if report.kept == 0:
        raise UserError("data: no usable records (see the skipped counts above)")
    held_out = None
    split_parts = []
    for part in parts:
        n_eval = _eval_count(data_cfg.eval_size, len(part))
        if n_eval:
            split = part.train_test_split(test_size=n_eval, seed=seed)
            split_parts.append(split["train"])
            held_out = split["test"] if held_out is None else datasets.concatenate_datasets([held_out, split["test"]])
        else:
            split_parts.append(part)
    if len(split_parts) == 1:
        train = split_parts[0]
    else:
        total = sum(weights)
        train = datasets.interleave_datasets(
            split_parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
        )
    report.train, report.held_out = len(train), len(held_out) if held_out is not None else 0
    for line in report.lines():
        log.info(line)
    return train, held_out, report


def _eval_count(eval_size: float, n: int) -> int:
    if eval_size <= 0:
        return 0
    count = int(eval_size) if eval_size >= 1 else round(eval_size * n)
    return min(max(count, 1), n - 1)
