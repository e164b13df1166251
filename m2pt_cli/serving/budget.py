"""How much work one prompt may ask for: its token count (chat template applied, image tokens
included) plus the tokens to generate must fit the model's context and ``--max-prompt-tokens``.

The count is checked before a request is queued, so the one worker never runs a prefill longer
than the limit; a text far too long to fit is refused from its length in characters before it is
tokenized at all. ``m2pt serve`` and ``m2pt chat`` share these checks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

# The character pre-check assumes a token stands for at most this many times the characters of its
# longest vocabulary entry (Unicode normalisation can fold a few characters into one).
NORMALISATION_SLACK = 2


class OverBudget(ValueError):
    """A prompt that cannot be answered within the limits; the message names the count and the limit."""


@dataclass(frozen=True)
class Budget:
    """The limits of one loaded model.

    Attributes:
        max_prompt_tokens: the most tokens a prompt may have (default: the recipe's ``data.max_length``).
        context: positions the language model has for the prompt and the answer (its
            ``max_position_embeddings`` less the text prompts in front); None: not known.
        max_token_chars: characters of the longest vocabulary entry (for the pre-check).
    """

    max_prompt_tokens: int
    context: int | None
    max_token_chars: int

    @property
    def max_chars(self) -> int:
        """Text longer than this cannot make a prompt of ``max_prompt_tokens`` tokens."""
        return self.max_prompt_tokens * self.max_token_chars * NORMALISATION_SLACK

    def check_chars(self, chars: int) -> None:
        """Refuse text that cannot fit, from its length alone (before tokenizing it)."""
        if chars > self.max_chars:
            raise OverBudget(
                f"the conversation's text is {chars} characters, more than a prompt of at most "
                f"{self.max_prompt_tokens} tokens can hold ({self.max_chars} characters); shorten it"
            )

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a prompt of ``prompt_tokens`` tokens that asks for ``max_tokens`` more."""
        if prompt_tokens > self.max_prompt_tokens:
            raise OverBudget(
                f"the prompt is {prompt_tokens} tokens (chat template and image tokens included), over the "
                f"limit of {self.max_prompt_tokens} (--max-prompt-tokens); shorten the conversation"
            )
        if self.context is not None and prompt_tokens + max_tokens > self.context:
            raise OverBudget(
                f"the prompt is {prompt_tokens} tokens and max_tokens asks for {max_tokens} more: "
                f"{prompt_tokens + max_tokens}, over the model's context of {self.context} tokens; "
                "shorten the conversation or lower max_tokens"
            )


def budget_of(loaded: Any, max_prompt_tokens: int | None = None) -> Budget:
    """The limits of ``loaded`` (a ``LoadedModel``); ``max_prompt_tokens`` None: ``data.max_length``."""
    limit = max_prompt_tokens if max_prompt_tokens is not None else loaded.recipe.data.max_length
    tower = loaded.backbone.language_tower(loaded.model.base)
    config = getattr(tower.stack, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    context = positions - loaded.model.m2pt_config.text_length if isinstance(positions, int) else None
    return Budget(limit, context, _longest_token(loaded.processor.tokenizer))


@functools.lru_cache(maxsize=8)
def _longest_token(tokenizer: Any) -> int:
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


def prompt_tokens(loaded: Any, prompt: str) -> int:
    """Tokens of a rendered ``prompt`` with its image, as ``generate`` feeds them to the model.

    Raises:
        ValueError: text the tokenizer cannot encode.
    """
    try:
        ids = loaded.processor.tokenizer(prompt)["input_ids"]
    except (TypeError, ValueError, UnicodeError) as exc:
        raise ValueError(f"the text cannot be tokenized ({type(exc).__name__})") from None
    return len(loaded.backbone.place_image_tokens(loaded.processor, list(ids), True))


def unencodable(text: str) -> str:
    """Why ``text`` is not valid Unicode text (a lone surrogate, as JSON's ``"\\ud800"`` gives), or ''."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start}"
    return ""
