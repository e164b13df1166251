"""One conversation -> token ids and labels (labels only on assistant replies and their end of turn)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m2pt_cli.chat import assistant_spans, end_of_turn, render, to_messages
from m2pt_cli.errors import UserError, quote


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


class Encoder:
    """Tokenizes conversations the way ``backbone.build_inputs`` would, with labels from the chat template.

    The text is tokenized once with character offsets (labels: tokens that start inside an
    assistant span); the backbone then places and expands the image tokens, which never get a
    label. Lengths and truncation are counted after expansion.
    """

    def __init__(self, processor: Any, backbone: Any, template: str, max_length: int) -> None:
        self.processor = processor
        self.backbone = backbone
        self.template = template
        self.max_length = max_length
        self.tokenizer = processor.tokenizer
        self.image_token_id = backbone.image_token_id(processor)
        self.end_of_turn = end_of_turn(processor, template)

    def messages(self, conversations: list[dict[str, str]], record_id: str) -> list[dict[str, Any]]:
        """Chat messages, with an image part where this backbone's text carries the image."""
        return to_messages(conversations, record_id, image_parts=self.backbone.image_in_text)

    def encode(self, conversations: list[dict[str, str]], record_id: str, has_image: bool = True) -> Encoded | None:
        """Ids and labels, or None when truncation would cut the image or leave no reply."""
        text, spans = assistant_spans(
            self.processor, self.messages(conversations, record_id), self.template, self.end_of_turn
        )
        enc = self.tokenizer(text, return_offsets_mapping=True)  # the text's only tokenization
        text_labels = [
            token if end > start and any(a <= start < b for a, b in spans) else -100
            for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]
        try:
            ids = self.backbone.place_image_tokens(self.processor, list(enc["input_ids"]), has_image)
        except ValueError as exc:
            raise UserError(f"record {quote(record_id, bare=True)}: {exc}") from None
        labels = _align(ids, list(enc["input_ids"]), text_labels, self.image_token_id, record_id)
        truncated = len(ids) > self.max_length
        if truncated:
            if self.image_token_id in ids[self.max_length :]:
                return None
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == -100 for label in labels):
            return None
        return Encoded(ids, labels, truncated)

    def prompt_text(self, conversations: list[dict[str, str]], record_id: str) -> tuple[str, str]:
        """(prompt up to the last reply with the generation prompt, the last reply)."""
        messages = self.messages(conversations, record_id)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = render(self.processor, messages[:last], self.template, add_generation_prompt=True)
        answer = "".join(p["text"] for p in messages[last]["content"] if p["type"] == "text")
        return prompt, answer


def _align(ids: list[int], text_ids: list[int], text_labels: list[int], image_id: int, record_id: str) -> list[int]:
    """Labels for ``ids``: the text tokens' labels in order, -100 on the image tokens placed among them."""
    labels, j = [], 0
    for token in ids:
        if j < len(text_ids) and token == text_ids[j]:
            labels.append(text_labels[j])
            j += 1
        elif token == image_id:
            labels.append(-100)
        else:
            break
    if j != len(text_ids) or len(labels) != len(ids):
        raise RuntimeError(f"record {record_id}: backbone token ids differ from the tokenizer's (not image tokens)")
    return labels
