"""Cost curves: m2pt's step time and memory over prompt length and over sequence length."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from m2pt_cli.benchmark.memory import peak_memory_child, release
from m2pt_cli.benchmark.methods import Shapes, build_method, synthetic_batch
from m2pt_cli.benchmark.report import setting
from m2pt_cli.benchmark.timing import percentile, time_steps
from m2pt_cli.errors import UserError
from m2pt_cli.recipes import display_name

# axis -> what one point sets: the LLM's prompt length (recipe override) or the tokens per row
CURVE_AXES = {"prompt": "prompts.text.length", "seq": "--seq-len"}


def parse_curve(spec: str) -> tuple[str, list[int]]:
    """``prompt=0,5,10`` or ``seq=128,256`` -> (axis, ascending distinct values).

    Raises:
        UserError: another axis, a value that is not a whole number, a negative prompt length, a
            sequence length under 8, or fewer than two points.
    """
    axis, sep, listed = spec.partition("=")
    if not sep or axis not in CURVE_AXES:
        raise UserError(f"--curve: {spec!r} is not AXIS=V1,V2,... with AXIS one of {', '.join(CURVE_AXES)}")
    try:
        values = sorted({int(v) for v in listed.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--curve: {spec!r} holds a value that is not a whole number") from None
    lowest = 0 if axis == "prompt" else 8
    if len(values) < 2 or values[0] < lowest:
        raise UserError(f"--curve: {spec!r} needs at least two values, each at least {lowest}")
    return axis, values


def curve(
    recipe_path: Path,
    axis: str,
    values: list[int],
    overrides: tuple[str, ...],
    steps: int,
    warmup: int,
    shapes: Shapes,
    device: str,
    memory: bool = True,
) -> dict[str, Any]:
    """m2pt's training step time (the points taking turns) and peak memory at each point of ``axis``.

    ``prompt``: one model per prompt length (``prompts.text.length``; visual prompts as the recipe
    has them), one batch of ``shapes``. ``seq``: one model, one batch per sequence length. Also the
    least-squares slope of step time and of memory per token a point adds to each row.
    """
    point_overrides = {v: (f"prompts.text.length={v}",) if axis == "prompt" else () for v in values}
    times, point_shapes = _time_points(
        recipe_path, axis, values, overrides, point_overrides, shapes, steps, warmup, device
    )
    release(device)  # the models went with _time_points: the memory probes below may have it
    points = []
    for v in values:
        samples = sorted(times[v])
        point = {
            "value": v,
            "tokens_added": v - values[0],
            "step_seconds_median": statistics.median(samples),
            "step_seconds_p10": percentile(samples, 0.1),
            "step_seconds_p90": percentile(samples, 0.9),
        }
        if memory:
            point["peak_memory_bytes"] = peak_memory_child(
                recipe_path, "m2pt", overrides + point_overrides[v], point_shapes[v], 2, device
            )
        points.append(point)
    added = [p["tokens_added"] for p in points]
    result = {"setting": CURVE_AXES[axis], "points": points}
    result["slope_seconds_per_token"] = _slope(added, [p["step_seconds_median"] for p in points])
    if memory:
        result["slope_bytes_per_token"] = _slope(added, [p["peak_memory_bytes"] for p in points])
    return result


def _time_points(
    recipe_path: Path,
    axis: str,
    values: list[int],
    overrides: tuple[str, ...],
    point_overrides: dict[int, tuple[str, ...]],
    shapes: Shapes,
    steps: int,
    warmup: int,
    device: str,
) -> tuple[dict[int, list[float]], dict[int, Shapes]]:
    """Step times of every point, the points taking turns, and each point's batch shape."""
    torch.manual_seed(0)
    if axis == "prompt":
        built = {v: build_method(recipe_path, "m2pt", overrides + point_overrides[v], device) for v in values}
        batch = synthetic_batch(built[values[0]][0], built[values[0]][1], shapes, device)
        arms = {v: (model, optimizer, batch) for v, (model, _, optimizer) in built.items()}
        point_shapes = dict.fromkeys(values, shapes)
    else:
        model, processor, optimizer = build_method(recipe_path, "m2pt", overrides, device)
        point_shapes = {v: Shapes(shapes.batch_size, v) for v in values}
        arms = {v: (model, optimizer, synthetic_batch(model, processor, point_shapes[v], device)) for v in values}
    return time_steps(arms, steps, warmup, device), point_shapes


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def curves_report(
    recipe_path: Path,
    overrides: tuple[str, ...],
    shapes: Shapes,
    steps: int,
    warmup: int,
    device: str,
    curves: dict[str, dict],
) -> dict[str, Any]:
    """The report of ``m2pt bench --curve``: each curve, and the prompt / text slope ratio when both ran."""
    report: dict[str, Any] = {**setting(recipe_path, overrides, device, shapes, steps, warmup), "curves": curves}
    if {"prompt", "seq"} <= set(curves):
        prompt, text = curves["prompt"], curves["seq"]
        report["prompt_over_text_slope"] = prompt["slope_seconds_per_token"] / text["slope_seconds_per_token"]
        if "slope_bytes_per_token" in prompt and "slope_bytes_per_token" in text:
            report["prompt_over_text_memory_slope"] = prompt["slope_bytes_per_token"] / text["slope_bytes_per_token"]
    return report


def curves_markdown(report: dict[str, Any]) -> str:
    """The README table of ``m2pt bench --curve``."""
    lines = [
        f"`m2pt bench {display_name(report['recipe'])} --curve` on {report['hardware']} ({report['device']}), "
        f"{report['date']}; "
        f"batch {report['batch_size']}, median of {report['steps']} steps",
        "",
        "| curve | value | tokens added per row | step (ms) | p10-p90 (ms) | peak memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    extra = []
    for axis, result in report["curves"].items():
        for p in result["points"]:
            memory = f"{p['peak_memory_bytes'] / 2**20:.0f}" if "peak_memory_bytes" in p else "n/a"
            lines.append(
                f"| {axis} ({result['setting']}) | {p['value']} | {p['tokens_added']} | "
                f"{1000 * p['step_seconds_median']:.1f} | {1000 * p['step_seconds_p10']:.1f}-"
                f"{1000 * p['step_seconds_p90']:.1f} | {memory} |"
            )
        slope = f"{axis}: {1000 * result['slope_seconds_per_token']:.3f} ms per added token"
        if "slope_bytes_per_token" in result:
            slope += f", {result['slope_bytes_per_token'] / 1024:.1f} KiB peak memory per added token"
        extra.append(slope)
    if "prompt_over_text_slope" in report:
        ratio = f"per prompt token / per text token: {report['prompt_over_text_slope']:.2f}x step time"
        if "prompt_over_text_memory_slope" in report:
            ratio += f", {report['prompt_over_text_memory_slope']:.2f}x memory"
        extra.append(ratio)
    return "\n".join(lines + [""] + [f"- {line}" for line in extra]) + "\n"


def plot_curves(report: dict[str, Any], path: Path) -> Path:
    """PNG: step time and peak memory over the tokens each curve adds per row (a line per curve)."""
    from m2pt_cli.plots import SIZE_INCHES, _pyplot, _save

    plt = _pyplot()
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(SIZE_INCHES[0] * 1.6, SIZE_INCHES[1]))
    for axis, result in report["curves"].items():
        added = [p["tokens_added"] for p in result["points"]]
        label = f"{axis} ({result['setting']})"
        time_ax.plot(added, [1000 * p["step_seconds_median"] for p in result["points"]], marker="o", label=label)
        if all("peak_memory_bytes" in p for p in result["points"]):
            memory = [p["peak_memory_bytes"] / 2**20 for p in result["points"]]
            memory_ax.plot(added, memory, marker="o", label=label)
    time_ax.set(xlabel="tokens added per row", ylabel="training step (ms)", title="step time")
    memory_ax.set(xlabel="tokens added per row", ylabel="peak memory (MiB)", title="peak memory")
    for ax in (time_ax, memory_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"m2pt bench {Path(report['recipe']).stem}: cost per added token")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
