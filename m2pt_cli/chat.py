"""Conversations: LLaVA records -> chat messages -> prompt text, through a chat template.

One rendering path serves training (labels on assistant replies) and generation (the prompt ends
with the assistant's turn opening), so both see the same text.
"""

from __future__ import annotations

from typing import Any

from m2pt_cli import jinja_bounds
from m2pt_cli.backbones.templates import PLAIN, VICUNA_V1
from m2pt_cli.errors import UserError, first_line, quote

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
            raise UserError(
                f"record {quote(record_id, bare=True)}: a turn needs 'from' (human or gpt) and a text 'value', "
                f"got {quote(turn)}"
            )
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


def conversation_prompt(
    processor: Any, backbone: Any, turns: list[tuple[str, str]], question: str, template: str, image_turn: int = 0
) -> str:
    """The generation prompt for a multi-turn conversation about one image.

    ``turns`` are the earlier (question, answer) pairs, ``question`` the new one; the image sits in
    front of user turn ``image_turn`` (0: the first, as in training records), since the backbones
    take one image per conversation. A ``<image>`` a user typed is dropped (it would add a second
    image). With no earlier turns this is :func:`question_prompt`.
    """
    questions = [q.replace(IMAGE_PLACEHOLDER, "").strip() for q in [*(q for q, _ in turns), question]]
    records: list[dict[str, str]] = []
    for k, text in enumerate(questions):
        records.append({"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{text}" if k == image_turn else text})
        if k < len(turns):
            records.append({"from": "gpt", "value": turns[k][1]})
    messages = to_messages(records, "?", backbone.image_in_text)
    return render(processor, messages, template, add_generation_prompt=True)


def render(processor: Any, messages: list[dict[str, Any]], template: str, add_generation_prompt: bool) -> str:
    """Prompt text of ``messages`` with the named template (``processor``, ``vicuna_v1`` or ``plain``),
    rendered within :mod:`m2pt_cli.jinja_bounds`' size and time bounds."""
    if template == "processor" and not getattr(processor, "chat_template", None):
        raise UserError(
            "model.chat_template: the model's processor has no chat template; set model.chat_template to "
            "vicuna_v1 or plain"
        )
    from jinja2.exceptions import TemplateError

    jinja_bounds.install()
    try:
        return processor.apply_chat_template(
            messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except (TemplateError, RecursionError) as exc:  # a bound, the sandbox, or the template's own refusal
        source = "the model's own chat template" if template == "processor" else f"the {template} template"
        raise UserError(f"model.chat_template: {source} cannot be rendered ({quote(first_line(exc))})") from None


_PROBE = "m2pt-probe-reply"


def end_of_turn(processor: Any, template: str) -> str:
    """The special token that ends an assistant turn under ``template``: what training labels after
    each reply and what generation stops at.

    Raises:
        UserError: the template ends a reply with text that is not one special token of the
            tokenizer (the model would learn to write it as characters and never stop).
    """
    probe = [
        {"role": "user", "content": [{"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]},
    ]
    after = render(processor, probe, template, add_generation_prompt=False).rsplit(_PROBE, 1)[-1]
    tokenizer = processor.tokenizer
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    found = [token for token in specials if token and after.startswith(token)]
    if not found:
        source = "the model's own" if template == "processor" else template
        raise UserError(
            f"model.chat_template: {source} template ends an assistant turn with {after[:20]!r}, which is not a "
            f"special token of the tokenizer (its end of sequence: {tokenizer.eos_token!r}), so replies would never "
            "end; use vicuna_v1 or plain, which end a turn with the tokenizer's end-of-sequence token"
        )
    return max(found, key=len)


def assistant_spans(
    processor: Any, messages: list[dict[str, Any]], template: str, eot: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans of each assistant reply, through its end-of-turn token.

    A reply starts at the end of the text rendered up to its turn with the generation prompt and
    ends after the template's last end-of-turn token in its turn (text the template writes after
    that token, such as a newline, is not part of the reply). ``eot``: :func:`end_of_turn`.
    """
    full = render(processor, messages, template, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(processor, messages[:k], template, add_generation_prompt=True))
        last = k + 1 == len(messages)  # the whole conversation: rendered above already
        through = full if last else render(processor, messages[: k + 1], template, add_generation_prompt=False)
        if not full.startswith(through):
            raise ValueError("the chat template renders a conversation differently from its prefixes")
        end = through.rfind(eot, start)
        if end < 0:
            raise ValueError(f"the chat template does not end a reply with {eot!r}")
        spans.append((start, end + len(eot)))
    return full, spans
