"""Log-likelihood of a continuation after a question about an image, as the model answers it.

The context is the question rendered exactly as for answering (the recipe's chat template with the
image, ending with the assistant's turn opening: the generation prompt); the continuation is the
text the model would write next. The score is the sum of the log-probabilities of the
continuation's tokens and whether greedy decoding would give each of them (lmms-eval's and
lm-eval-harness' ``loglikelihood``).

Boundary tokenization:

1. Whitespace at the end of the rendered context moves onto the continuation (as lm-eval-harness
   does): ``"ASSISTANT: " + "yes"`` is scored as ``"ASSISTANT:" + " yes"``.
2. The context and context+continuation are tokenized through the processor, as generation does
   (image tokens included); the continuation's tokens are the joint tokens after the longest common
   prefix of the two.
3. Usually the context's tokens are a prefix of the joint tokens, so that prefix is the whole
   context and the score is exactly ``log P(continuation | context)``. Where the tokenizer merges
   the context's last token(s) with the continuation's start (``":"`` and ``" yes"`` into ``": "``
   and ``"yes"``), the merged tokens count as the continuation's: the score is the log-probability
   of the joint tokens from the first one that differs, so it also covers the few context
   characters that merged (lm-eval-harness instead drops the continuation's first characters,
   which can leave nothing to score). Choices that merge alike share that term, so their ranking
   is unaffected.

The joint sequences are batched left-padded, as generation batches prompts; the m2pt prompt hooks
derive position ids from the attention mask, so padding does not move a row's positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from m2pt_cli.answering import _inputs

# Longest continuation scored (tokens); multiple-choice answers and perplexity passages fit easily.
MAX_CONTINUATION_TOKENS = 1024
# The character pre-check allows a token this many times the characters of the longest vocabulary
# entry (as m2pt_cli.serving.budget: Unicode normalisation can fold a few characters into one).
NORMALISATION_SLACK = 2


class OverLimit(ValueError):
    """A request longer than a limit; the one-line message names the count and the limit."""


@dataclass(frozen=True)
class Limits:
    """Bounds checked before anything is computed.

    Attributes:
        max_sequence_tokens: the most tokens of context + continuation, image tokens included (the
            language model's positions less the text prompts in front).
        max_continuation_tokens: the most tokens of one continuation.
        max_token_chars: characters of the tokenizer's longest vocabulary entry (for the pre-check
            on lengths in characters, done before tokenizing).
    """

    max_sequence_tokens: int
    max_continuation_tokens: int = MAX_CONTINUATION_TOKENS
    max_token_chars: int = 1

    def check_chars(self, context: str, continuation: str) -> None:
        """Refuse texts that cannot fit, from their lengths alone (before tokenizing)."""
        per_token = self.max_token_chars * NORMALISATION_SLACK
        most = self.max_continuation_tokens * per_token
        if len(continuation) > most:
            raise OverLimit(
                f"a continuation of {len(continuation)} characters cannot fit the limit of "
                f"{self.max_continuation_tokens} continuation tokens ({most} characters)"
            )
        if len(context) + len(continuation) > self.max_sequence_tokens * per_token:
            raise OverLimit(
                f"context and continuation of {len(context) + len(continuation)} characters cannot fit the model's "
                f"{self.max_sequence_tokens} tokens ({self.max_sequence_tokens * per_token} characters)"
            )

    def check_tokens(self, sequence: int, continuation: int) -> None:
        if continuation > self.max_continuation_tokens:
            raise OverLimit(
                f"a continuation of {continuation} tokens is over the limit of {self.max_continuation_tokens} "
                "continuation tokens"
            )
        if sequence > self.max_sequence_tokens:
            raise OverLimit(
                f"context and continuation are {sequence} tokens (chat template and image tokens included), over "
                f"the model's limit of {self.max_sequence_tokens} tokens"
            )


def limits_of(loaded: Any, max_continuation_tokens: int = MAX_CONTINUATION_TOKENS) -> Limits:
    """The limits of a ``LoadedModel``: its language model's positions less the text prompts in front
    (the recipe's ``data.max_length`` where the model does not say)."""
    tower = loaded.backbone.language_tower(loaded.model.base)
    positions = getattr(getattr(tower.stack, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int):
        sequence = positions - loaded.model.m2pt_config.text_length
    else:
        sequence = loaded.recipe.data.max_length
    vocab = loaded.processor.tokenizer.get_vocab()
    longest = max((len(token) for token in vocab), default=1) or 1
    return Limits(sequence, max_continuation_tokens, longest)


def move_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """``context`` without its trailing whitespace, which goes in front of ``continuation``."""
    kept = context.rstrip()
    return kept, context[len(kept) :] + continuation


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _rows(inputs: dict) -> list[list[int]]:
    """Each row's real token ids (the attention mask's ones), padding dropped."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    if mask is None:
        return [row.tolist() for row in ids]
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def continuation_logprobs(
    model: Any,
    processor: Any,
    backbone: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    requests: Sequence[str],
    continuations: Sequence[str],
    limits: Limits,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[tuple[float, bool]]:
    """``(log P(continuation | prompt), is_greedy)`` for one batch, in one forward.

    Args:
        prompts: the rendered generation prompts (``LoadedModel.prompt``), one per image.
        requests: the plain questions (InstructBLIP's Q-Former reads them), as for answering.
        continuations: the texts to score (module docstring: boundary tokenization).
        limits: checked before the forward (``OverLimit`` names the one exceeded).
    """
    pairs = [move_whitespace(p, c) for p, c in zip(prompts, continuations, strict=True)]
    for context, continuation in pairs:
        limits.check_chars(context, continuation)
    tokenizer = processor.tokenizer
    was_training = model.training
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    try:
        contexts = _rows(_inputs(backbone, processor, images, [c for c, _ in pairs], list(requests)))
        inputs = _inputs(backbone, processor, images, [c + x for c, x in pairs], list(requests))
        joint = _rows(inputs)
        # the first token has no logit predicting it: at least one token stays context
        starts = [max(1, common_prefix(c, j)) for c, j in zip(contexts, joint, strict=True)]
        counts = [len(j) - s for j, s in zip(joint, starts, strict=True)]
        for row, count in zip(joint, counts, strict=True):
            limits.check_tokens(len(row), count)
        device = next(model.parameters()).device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        keep = max(counts) + 1  # left padding: every row's continuation ends at the last column
        extra = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
        with torch.no_grad(), autocast():
            logits = model(**inputs, **extra).logits[:, -keep:]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    out: list[tuple[float, bool]] = []
    for i, (row, count) in enumerate(zip(joint, counts, strict=True)):
        if count == 0:  # an empty continuation: probability one, and greedy decoding "gives" it
            out.append((0.0, True))
            continue
        target = torch.tensor(row[-count:], device=logits.device)
        scores = logits[i, keep - 1 - count : keep - 1].float().log_softmax(-1)
        logprob = scores.gather(-1, target[:, None]).sum()
        out.append((float(logprob), bool((scores.argmax(-1) == target).all())))
    return out


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the base model's forward can compute only the last positions' logits."""
    base = getattr(model, "base", model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def likelihoods(
    loaded: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
    limits: Limits | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """``continuation_logprobs`` for ``questions`` (one RGB image each) rendered as ``loaded``
    answers them, in batches of ``batch_size`` (longest first, so rows of a batch pad little),
    returned in the given order. ``progress`` is called with each batch's size."""
    limits = limits or limits_of(loaded)
    for question, continuation in zip(questions, continuations, strict=True):
        limits.check_chars(question, continuation)  # before rendering anything
    prompts = [loaded.prompt(question) for question in questions]
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(continuations[i])))
    results: list[tuple[float, bool] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        scores = continuation_logprobs(
            loaded.model,
            loaded.processor,
            loaded.backbone,
            [images[i] for i in batch],
            [prompts[i] for i in batch],
            [questions[i] for i in batch],
            [continuations[i] for i in batch],
            limits,
            loaded.autocast,
        )
        for i, score in zip(batch, scores, strict=True):
            results[i] = score
        if progress is not None:
            progress(len(batch))
    return results  # type: ignore[return-value]
