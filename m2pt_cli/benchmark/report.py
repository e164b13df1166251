"""What a report was measured on, its Markdown table and its files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from m2pt_cli import config as recipe_config
from m2pt_cli.benchmark.methods import Shapes
from m2pt_cli.benchmark.prompt_path import DECODE_TOKENS
from m2pt_cli.files import write_text_atomic
from m2pt_cli.recipes import display_name


def setting(
    recipe_path: Path, overrides: tuple[str, ...], device: str, shapes: Shapes, steps: int, warmup: int
) -> dict[str, Any]:
    """What a report was measured on: recipe, overrides, device, machine, date, shapes, steps."""
    return {
        "recipe": str(recipe_path),
        "overrides": list(overrides),
        "device": device,
        "hardware": hardware(device),
        "date": time.strftime("%Y-%m-%d"),
        "batch_size": shapes.batch_size,
        "seq_len": shapes.seq_len,
        "steps": steps,
        "warmup": warmup,
        "gradient_checkpointing": recipe_config.load(recipe_path, overrides).train.gradient_checkpointing,
    }


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown(report: dict[str, Any]) -> str:
    """The README table."""
    lines = [
        f"`m2pt bench {display_name(report['recipe'])}` on {report['hardware']} ({report['device']}), "
        f"{report['date']}; "
        f"batch {report['batch_size']} x {report['seq_len']} tokens, median of {report['steps']} steps"
        + (", gradient checkpointing" if report.get("gradient_checkpointing") else ""),
        "",
        "| method | step (ms) | p10-p90 (ms) | x m2pt | peak memory (MiB) | trainable | optimizer state (KiB) "
        "| adapter (KiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        memory = f"{r['peak_memory_bytes'] / 2**20:.0f}" if "peak_memory_bytes" in r else "n/a"
        lines.append(
            f"| {r['method']} | {1000 * r['step_seconds_median']:.1f} | {1000 * r['step_seconds_p10']:.1f}-"
            f"{1000 * r['step_seconds_p90']:.1f} | {r['ratio_to_m2pt']:.2f} | {memory} | {r['trainable_parameters']:,} "
            f"| {r['optimizer_state_bytes'] / 1024:.0f} | {r['adapter_bytes'] / 1024:.0f} |"
        )
    extra = [
        f"{r['method'].removesuffix('+compiled')} compiled / eager step time: {r['compiled_over_eager']:.2f} "
        f"(torch.compile, first step {r['compile_seconds']:.0f} s; {r['graph_breaks']} graph breaks in a forward, "
        f"{r['graph_breaks_in_layers']} inside the encoder and decoder layers)"
        for r in report["rows"]
        if r.get("compiled")
    ]
    if "m2pt_over_floor" in report:
        extra.append(f"m2pt / floor step time: {report['m2pt_over_floor']:.2f} (gradients through both towers)")
    if "m2pt_over_limit" in report:
        extra.append(f"m2pt / limit step time: {report['m2pt_over_limit']:.2f} (gradients through the LLM only)")
    if "forward_ratio" in report:
        extra.append(
            f"forward with / without prompts: {report['forward_ratio']:.3f} (token ratio {report['token_ratio']:.3f}, "
            f"overhead {report['forward_overhead_over_token_ratio']:.3f}x)"
        )
        extra.append(
            f"greedy decode with KV cache (batch 1, {DECODE_TOKENS} tokens, prefill excluded): "
            f"{report['decode_tokens_per_second_with_prompts']:.0f} tokens/s with prompts, "
            f"{report['decode_tokens_per_second_without_prompts']:.0f} without ({report['decode_ratio']:.2f}x)"
        )
    if "eval_batch_speedup" in report:
        extra.append(
            f"evaluation (greedy, {report['eval_samples']} samples, at most {report['eval_max_new_tokens']} new "
            f"tokens, LoadedModel.answer): {report['eval_samples_per_second_batch_1']:.2f} samples/s at batch 1, "
            f"{report['eval_samples_per_second_batch_default']:.2f} at batch {report['eval_batch_size']} "
            f"({report['eval_batch_speedup']:.2f}x; same answers: {'yes' if report['eval_answers_agree'] else 'no'})"
        )
    return "\n".join(lines + [""] + [f"- {line}" for line in extra]) + "\n"


def write_report(path: Path, report: dict[str, Any], table: str) -> None:
    """JSON report and its markdown table, each written through a temporary file."""
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(path.with_suffix(".md"), table)
