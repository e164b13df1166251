"""One conversation -> token ids and labels (labels only on assistant replies and their end of turn)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from m2pt_cli.chat import IMAGE_PLACEHOLDER, assistant_spans, to_messages


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


class Encoder:
    """Tokenizes conversations the way the processor would, with labels from the chat template.

    Image placeholders are expanded to the number of image tokens the processor uses, so lengths
    and truncation are counted after expansion.
    """

    def __init__(self, processor: Any, backbone: Any, template: str, max_length: int) -> None:
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        probe = backbone.build_inputs(processor, [Image.new("RGB", (32, 32))], [self.image_token])
        self.tokens_per_image = int((probe["input_ids"][0] == self.image_token_id).sum())

    def encode(self, conversations: list[dict[str, str]], record_id: str) -> Encoded | None:
        """Ids and labels, or None when truncation would cut the image or leave no reply."""
        messages = to_messages(conversations, record_id)
        text, spans = assistant_spans(self.processor, messages, self.template)
        expanded, shifted = self._expand(text, spans)
        enc = self.tokenizer(expanded, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            token if end > start and any(a <= start < b for a, b in shifted) else -100
            for token, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        truncated = len(ids) > self.max_length
        if truncated:
            if self.image_token_id in ids[self.max_length :]:
                return None
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == -100 for label in labels):
            return None
        return Encoded(ids, labels, truncated)

    def _expand(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        extra = len(self.image_token) * (self.tokens_per_image - 1)

        def shift(position: int) -> int:
            return position + extra * text.count(self.image_token, 0, position)

        expanded = text.replace(self.image_token, self.image_token * self.tokens_per_image)
        return expanded, [(shift(a), shift(b)) for a, b in spans]

    def prompt_text(self, conversations: list[dict[str, str]], record_id: str) -> tuple[str, str]:
        """(prompt up to the last reply with the generation prompt, the last reply)."""
        from m2pt_cli.chat import render

        messages = to_messages(conversations, record_id)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = render(self.processor, messages[:last], self.template, add_generation_prompt=True)
        answer = "".join(p["text"] for p in messages[last]["content"] if p["type"] == "text")
        return prompt, answer
