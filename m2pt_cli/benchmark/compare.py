"""``m2pt bench``'s main measurement: every method timed in one process, step by step in turn."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from m2pt_cli import config as recipe_config
from m2pt_cli.benchmark.compiled import COMPILED, graph_breaks
from m2pt_cli.benchmark.evaluation import EVAL_BATCH_SIZE, EVAL_NEW_TOKENS, eval_throughput
from m2pt_cli.benchmark.memory import peak_memory_child, release
from m2pt_cli.benchmark.methods import (
    FROZEN,
    Shapes,
    build_method,
    method_recipe,
    optimizer_bytes,
    split_method,
    synthetic_batch,
    train_step,
)
from m2pt_cli.benchmark.prompt_path import measure_prompt_path
from m2pt_cli.benchmark.report import setting
from m2pt_cli.benchmark.timing import percentile, time_steps


def run(
    recipe_path: Path,
    methods: list[str],
    overrides: tuple[str, ...],
    steps: int,
    warmup: int,
    batch_size: int | None,
    seq_len: int | None,
    device: str,
    memory: bool = True,
    prompt_path: bool = True,
    eval_batch_size: int | None = EVAL_BATCH_SIZE,
    compile: bool = False,
) -> dict[str, Any]:
    """Measure every method; returns the report (rows, the prompt-path checks and the evaluation
    throughput, each but the rows when asked for and m2pt is among ``methods``).

    The methods' models are freed before the memory probes, so that a probe (a child process) never
    shares the machine's memory with them. ``eval_batch_size`` None skips the evaluation throughput.
    ``compile``: each method also as ``METHOD+compiled`` (``torch.compile`` of the same model, same
    optimizer), timed in turn with the eager arms after one untimed compiling step, with its graph
    breaks counted (``compiled.graph_breaks``).
    """
    recipe = recipe_config.load(recipe_path, overrides)  # defaults: the recipe's own batch shape
    shapes = Shapes(batch_size or recipe.train.per_device_batch_size, seq_len or recipe.data.max_length)
    torch.manual_seed(0)
    built = {m: build_method(recipe_path, m, overrides, device) for m in methods}
    any_model, any_processor, _ = next(iter(built.values()))
    batch = synthetic_batch(any_model, any_processor, shapes, device)
    del any_model, any_processor
    arms = {method: (model, optimizer, batch) for method, (model, _, optimizer) in built.items()}
    compiled = _compiled_arms(arms) if compile else {}
    times = time_steps({**arms, **{name: arm for name, (arm, _) in compiled.items()}}, steps, warmup, device)
    del arms
    rows = [_row(method, built[method], times[method]) for method in methods]
    for name, (_, details) in compiled.items():
        method = name.removesuffix(COMPILED)
        eager = next(r for r in rows if r["method"] == method)
        row = {**_row(name, built[method], times[name]), **details}
        row["compiled_over_eager"] = row["step_seconds_median"] / eager["step_seconds_median"]
        rows.insert(rows.index(eager) + 1, row)
    compiled.clear()
    for method in [m for m in built if m != "m2pt"]:  # the prompt path builds one more model: make room
        del built[method]
    release(device)
    reference = next((r for r in rows if r["method"] == "m2pt"), rows[0])
    for row in rows:
        row["ratio_to_m2pt"] = row["step_seconds_median"] / reference["step_seconds_median"]
    report: dict[str, Any] = {**setting(recipe_path, overrides, device, shapes, steps, warmup), "rows": rows}
    for frozen in FROZEN:
        if "m2pt" in built and frozen in methods:
            floor_row = next(r for r in rows if r["method"] == frozen)
            report[f"m2pt_over_{frozen}"] = reference["step_seconds_median"] / floor_row["step_seconds_median"]
    if "m2pt" in built and prompt_path:
        report.update(measure_prompt_path(built["m2pt"][0], recipe_path, overrides, batch, shapes, device))
    if "m2pt" in built and eval_batch_size is not None:
        model, processor, _ = built["m2pt"]
        recipe = method_recipe(recipe_path, "m2pt", overrides)
        report.update(eval_throughput(model, processor, recipe, eval_batch_size, EVAL_NEW_TOKENS, 3, device))
        del model, processor
    built.clear()  # the probes below run one method each in a child process: leave them the memory
    del batch
    release(device)
    if memory:
        for row in (r for r in rows if not r.get("compiled")):  # a compiled arm shares its model
            row["peak_memory_bytes"] = peak_memory_child(recipe_path, row["method"], overrides, shapes, 2, device)
    return report


def _compiled_arms(arms: dict[str, tuple]) -> dict[str, tuple[tuple, dict[str, Any]]]:
    """``METHOD+compiled`` -> ((compiled model, optimizer, batch), its graph breaks and compile seconds).

    The graph breaks are counted first (``torch._dynamo.explain``, which resets dynamo's caches), then
    each compiled model takes one training step, which compiles it, outside the timing."""
    compiled = {}
    for method, (model, optimizer, batch) in arms.items():
        details = {"compiled": True, **graph_breaks(model, batch)}
        compiled[method + COMPILED] = ((torch.compile(model), optimizer, batch), details)
    for (model, optimizer, batch), details in compiled.values():
        started = time.perf_counter()
        train_step(model, optimizer, batch)
        details["compile_seconds"] = time.perf_counter() - started
    return compiled


def _row(method: str, built: tuple, times: list[float]) -> dict[str, Any]:
    """One method's row: step-time statistics and what it trains and stores."""
    model, _, optimizer = built
    samples = sorted(times)
    return {
        "method": method,
        "step_seconds_median": statistics.median(samples),
        "step_seconds_p10": percentile(samples, 0.1),
        "step_seconds_p90": percentile(samples, 0.9),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_bytes(optimizer),
        "adapter_bytes": sum(t.nbytes for t in model.adapter_state_dict().values())
        if split_method(method.removesuffix(COMPILED))[0] not in FROZEN
        else 0,
    }
