"""Batches: encoded samples -> padded tensors and pixel values; prompts for generation."""

from __future__ import annotations

from typing import Any

import torch

from m2pt_cli.chat import instruction
from m2pt_cli.data.images import DEFAULT_MAX_PIXELS, open_image
from m2pt_cli.errors import UserError

__all__ = ["TrainCollator", "open_image"]  # open_image: callers import it from here


class TrainCollator:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` and the batch's image inputs.

    A sample whose image fails to load or that the image policy refuses (``data.max_image_pixels``
    is ``max_image_pixels``) is dropped (``skip``) or stops training (``error``).
    """

    def __init__(
        self, processor: Any, backbone: Any, on_bad_record: str = "skip", max_image_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.processor = processor
        self.backbone = backbone
        self.on_bad_record = on_bad_record
        self.max_image_pixels = max_image_pixels
        self.pad_id = processor.tokenizer.pad_token_id
        self.dropped = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept, images, instructions = [], [], []
        for row in rows:
            if row["image"] is not None:
                try:
                    images.append(open_image(row["image"], row["id"], self.max_image_pixels))
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
