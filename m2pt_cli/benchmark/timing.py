"""Wall-clock timing on CPU or CUDA: training steps taking turns, forwards, greedy decodes."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from m2pt_cli.benchmark.methods import train_step


def sync(device: str) -> None:
    """Wait for the GPU's queued work (timings on CUDA are otherwise of the launch, not the work)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(arms: dict[Any, tuple], steps: int, warmup: int, device: str) -> dict[Any, list[float]]:
    """Seconds of each timed training step per arm (model, optimizer, batch), the arms taking turns
    step by step."""
    times: dict[Any, list[float]] = {name: [] for name in arms}
    for step in range(warmup + steps):
        for method, (model, optimizer, batch) in arms.items():  # interleaved: drift hits every arm alike
            sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            sync(device)
            if step >= warmup:
                times[method].append(time.perf_counter() - start)
    return times


def forward_seconds(model, batch, repeats: int, device: str) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model(**inputs)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate_seconds(model, inputs: dict, new_tokens: int, device: str) -> float:
    """Wall time of one greedy ``generate`` of exactly ``new_tokens`` tokens with the KV cache."""
    sync(device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    sync(device)
    return time.perf_counter() - start


def decode_tokens_per_second(models: dict[str, Any], batch, new_tokens: int, repeats: int, device: str) -> dict:
    """Decode speed of each model on the first sample of ``batch``, prefill excluded: ``new_tokens - 1``
    cached steps over the median time of ``new_tokens`` tokens minus that of one (the prefill).

    Same input, same number of tokens for every model; one warm-up each, then the models take turns.
    """
    inputs = {k: v[:1] for k, v in batch.items() if k != "labels"}
    times: dict[str, dict[int, list[float]]] = {name: {1: [], new_tokens: []} for name in models}
    for model in models.values():  # warm-up
        generate_seconds(model, inputs, 2, device)
    for _ in range(repeats):
        for name, model in models.items():
            for count in (1, new_tokens):
                times[name][count].append(generate_seconds(model, inputs, count, device))
    rates = {}
    for name, by_count in times.items():
        decode = statistics.median(by_count[new_tokens]) - statistics.median(by_count[1])
        rates[name] = (new_tokens - 1) / max(decode, 1e-9)
    return rates


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
