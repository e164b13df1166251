"""Evaluation throughput: greedy samples per second one at a time and in one left-padded batch."""

from __future__ import annotations

import statistics
import time
from typing import Any

from m2pt_cli.benchmark.methods import noise_images
from m2pt_cli.benchmark.timing import sync
from m2pt_cli.config import Recipe

EVAL_BATCH_SIZE = 8  # m2pt eval's default --batch-size (EvalSettings.batch_size)


EVAL_NEW_TOKENS = 16  # at most, per answer, in the evaluation throughput


EVAL_QUESTIONS = (
    "Describe the image.",
    "What colour is the largest object?",
    "Is there a dog in the picture? Answer yes or no.",
    "How many people can you see, and what are they doing?",
)


def eval_throughput(
    model, processor, recipe: Recipe, batch_size: int, max_new_tokens: int, repeats: int, device: str
) -> dict[str, Any]:
    """Greedy samples per second through the evaluation path (``LoadedModel.answer``, hence
    ``generate_answers``): ``batch_size`` noise images with questions of several lengths, answered
    one at a time and in one left-padded batch, taking turns; one warm-up each.
    """
    from m2pt_cli.answering import LoadedModel

    loaded = LoadedModel(model=model, processor=processor, recipe=recipe, backbone=model.backbone)
    images = noise_images(batch_size, seed=1)
    questions = [EVAL_QUESTIONS[i % len(EVAL_QUESTIONS)] for i in range(batch_size)]
    sizes = (1, batch_size)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    answers: dict[int, list[str]] = {}
    for size in sizes:  # warm-up
        loaded.answer(images[:size], questions[:size], max_new_tokens, size)
    for _ in range(repeats):
        for size in sizes:
            sync(device)
            start = time.perf_counter()
            answers[size] = loaded.answer(images, questions, max_new_tokens, size)
            sync(device)
            times[size].append(time.perf_counter() - start)
    one, many = (batch_size / statistics.median(times[size]) for size in sizes)
    return {
        "eval_samples": batch_size,
        "eval_max_new_tokens": max_new_tokens,
        "eval_batch_size": batch_size,
        "eval_samples_per_second_batch_1": one,
        "eval_samples_per_second_batch_default": many,
        "eval_batch_speedup": many / one,
        "eval_answers_agree": answers[1] == answers[batch_size],
    }
