"""Batches: encoded samples -> padded tensors and pixel values; prompts for generation."""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from m2pt_cli.chat import instruction
from m2pt_cli.errors import UserError


def open_image(ref: dict[str, Any], record_id: str) -> Image.Image:
    """Open an image reference as RGB; a truncated or unreadable file is a UserError naming the record."""
    try:
        source = io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"]
        with Image.open(source) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"record {record_id}: cannot read its image ({exc})") from None


class TrainCollator:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` and the batch's image inputs.

    A sample whose image fails to load is dropped (``skip``) or stops training (``error``).
    """

    def __init__(self, processor: Any, backbone: Any, on_bad_record: str = "skip") -> None:
        self.processor = processor
        self.backbone = backbone
        self.on_bad_record = on_bad_record
        self.pad_id = processor.tokenizer.pad_token_id
        self.dropped = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept, images, instructions = [], [], []
        for row in rows:
            if row["image"] is not None:
                try:
                    images.append(open_image(row["image"], row["id"]))
                    instructions.append(instruction(row["conversations"]))
                except UserError:
                    if self.on_bad_record == "error":
                        raise
                    self.dropped += 1
                    continue
            kept.append(row)
        if not kept:
            raise UserError(f"a whole batch had unreadable images (first id {rows[0]['id']})")
        length = max(len(r["input_ids"]) for r in kept)
        ids = torch.full((len(kept), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(kept), length), -100, dtype=torch.long)
        mask = torch.zeros((len(kept), length), dtype=torch.long)
        for i, row in enumerate(kept):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if images:
            batch.update(self.backbone.image_inputs(self.processor, images, instructions))
        return batch
