"""Conversations: LLaVA records -> chat messages -> prompt text, through a chat template.

One rendering path serves training (labels on assistant replies) and generation (the prompt ends
with the assistant's turn opening), so both see the same text.
"""

from __future__ import annotations

from typing import Any

from backbones.templates import PLAIN, VICUNA_V1
from m2pt_cli.errors import UserError

IMAGE_PLACEHOLDER = "<image>"

TEMPLATES = {"processor": None, "vicuna_v1": VICUNA_V1, "plain": PLAIN}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(
    conversations: list[dict[str, str]], record_id: str = "?", image_parts: bool = True
) -> list[dict[str, Any]]:
    """LLaVA turns (``{"from": "human"|"gpt", "value": ...}``) as chat-template messages.

    The ``<image>`` placeholder in a user turn becomes an image part in front of the text (or is
    dropped when ``image_parts`` is off: backbones whose processor places the image tokens itself).
    """
    messages = []
    for turn in conversations:
        role = ROLES.get(turn.get("from", ""))
        if role is None or not isinstance(turn.get("value"), str):
            raise UserError(f"record {record_id}: a turn needs 'from' (human or gpt) and a text 'value', got {turn!r}")
        text = turn["value"]
        parts: list[dict[str, str]] = []
        if role == "user" and IMAGE_PLACEHOLDER in text:
            if image_parts:
                parts.append({"type": "image"})
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        parts.append({"type": "text", "text": text})
        messages.append({"role": role, "content": parts})
    return messages


def instruction(conversations: list[dict[str, str]]) -> str:
    """The first user request without the image placeholder (what InstructBLIP's Q-Former reads)."""
    first = next((t["value"] for t in conversations if ROLES.get(t.get("from", "")) == "user"), "")
    return first.replace(IMAGE_PLACEHOLDER, "").strip()


def question_prompt(processor: Any, backbone: Any, question: str, template: str) -> str:
    """The generation prompt for one image and one question."""
    turn = {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"}
    messages = to_messages([turn], "?", backbone.image_in_text)
    return render(processor, messages, template, add_generation_prompt=True)


def render(processor: Any, messages: list[dict[str, Any]], template: str, add_generation_prompt: bool) -> str:
    """Prompt text of ``messages`` with the named template (``processor``, ``vicuna_v1`` or ``plain``)."""
    if template == "processor" and not getattr(processor, "chat_template", None):
        raise UserError(
            "model.chat_template: the model's processor has no chat template; set model.chat_template to "
            "vicuna_v1 or plain"
        )
    return processor.apply_chat_template(
        messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt, tokenize=False
    )


def assistant_spans(processor: Any, messages: list[dict[str, Any]], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans of each assistant reply (with its end-of-turn text).

    A reply spans from the end of the text rendered up to its turn with the generation prompt to
    the end of the text rendered through its turn.
    """
    full = render(processor, messages, template, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(processor, messages[:k], template, add_generation_prompt=True))
        through = render(processor, messages[: k + 1], template, add_generation_prompt=False)
        if not full.startswith(through):
            raise ValueError("the chat template renders a conversation differently from its prefixes")
        spans.append((start, len(through)))
    return full, spans
