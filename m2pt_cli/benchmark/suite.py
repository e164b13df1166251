"""``m2pt bench --suite gpu``: one run that checks and measures a machine end to end.

On CUDA: kernel and precision parity, then LLaVA-1.5-7B at full depth (``bench-7b-full``: random
weights, bf16, batch 4 x 1024, gradient checkpointing) for m2pt, LoRA and the two floors, full
finetuning's peak memory (measured, or extrapolated and marked so when it does not fit), decode and
evaluation throughput, 8-bit and 4-bit bases when bitsandbytes is installed, and ``m2pt serve``'s
requests per second at concurrency 1, 8 and 32. Elsewhere the same steps run on the tiny ``demo``
model, so that the suite runs in CI and cannot rot. One JSON report and a Markdown table beside it.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m2pt_cli.benchmark.compare import run
from m2pt_cli.benchmark.evaluation import EVAL_BATCH_SIZE
from m2pt_cli.benchmark.memory import peak_memory_child, release
from m2pt_cli.benchmark.methods import Shapes, method_recipe
from m2pt_cli.benchmark.parity import HALF_MARGIN, check_parity
from m2pt_cli.benchmark.report import hardware, markdown
from m2pt_cli.benchmark.serving import CONCURRENCY, noise_requests, requests_per_second, serving, time_to_first_token
from m2pt_cli.recipes import resolve

SUITES = ("gpu",)

METHODS = ["m2pt", "lora", "floor", "limit"]

QUANTIZED = ["m2pt", "m2pt@8bit", "m2pt@4bit"]


@dataclass(frozen=True)
class Plan:
    """What the suite runs on this device: recipes, shapes, steps and serving load."""

    parity_recipe: str
    parity_shapes: tuple[int, int]
    bench_recipe: str
    bench_shapes: tuple[int, int] | None  # None: the recipe's own batch and max_length
    steps: int
    warmup: int
    eval_batch_size: int
    serve_max_tokens: int
    serve_rounds: int
    serve_batches: int  # requests per round: this many full batches at each concurrency (at least 8 requests)
    ttft_requests: int  # streamed requests, one at a time, timed to their first text
    paper_shape: bool

    def serve_requests(self, concurrency: int) -> int:
        return max(8, self.serve_batches * concurrency)


def plan_for(device: str) -> Plan:
    if device.startswith("cuda"):
        return Plan("demo", (4, 128), "bench-7b-full", None, 10, 2, EVAL_BATCH_SIZE, 32, 2, 2, 20, True)
    return Plan("demo", (3, 64), "demo", (2, 64), 2, 1, 2, 4, 1, 1, 8, False)


def run_suite(
    device: str, log: Callable[[str], None], keep: Callable[[dict[str, Any]], None] = lambda report: None
) -> dict[str, Any]:
    """Every step in turn; a step that raises is recorded (``error``) and the next one runs. ``keep``
    gets the report after every step (a run cut short keeps what it measured)."""
    from m2pt_cli.environment import collect

    plan = plan_for(device)
    report: dict[str, Any] = {
        "suite": "gpu",
        "device": device,
        "hardware": hardware(device),
        "date": time.strftime("%Y-%m-%d"),
        "plan": asdict(plan),
        "environment": collect(),
        "steps": {},
    }
    steps = {
        "parity": lambda: _parity(plan, device),
        "training": lambda: _training(plan, device),
        "quantized": lambda: _quantized(plan, device),
        "serving": lambda: _serving(plan, device),
    }
    for name, step in steps.items():
        log(f"suite: {name} ...")
        started = time.perf_counter()
        try:
            result = step()
        except Exception as exc:  # the next steps' figures are worth keeping: record and go on
            result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
            log(traceback.format_exc())
        result["seconds"] = time.perf_counter() - started
        report["steps"][name] = result
        release(device)
        log(f"suite: {name} done in {result['seconds']:.0f} s" + (f" ({result['error']})" if "error" in result else ""))
        report["goals"] = goals(report)
        report["failed"] = failures(report)
        keep(report)
    return report


def _parity(plan: Plan, device: str) -> dict[str, Any]:
    return check_parity(resolve(plan.parity_recipe), (), Shapes(*plan.parity_shapes), device)


def _training(plan: Plan, device: str) -> dict[str, Any]:
    """The methods side by side, then full finetuning's peak memory in a child process."""
    recipe = resolve(plan.bench_recipe)
    batch, seq = plan.bench_shapes or (None, None)
    result = run(recipe, METHODS, (), plan.steps, plan.warmup, batch, seq, device, eval_batch_size=plan.eval_batch_size)
    shapes = Shapes(result["batch_size"], result["seq_len"])
    m2pt = next(r for r in result["rows"] if r["method"] == "m2pt")
    try:
        result["full_peak_memory_bytes"] = peak_memory_child(recipe, "full", (), shapes, 2, device)
        result["full_peak_memory_extrapolated"] = False
    except RuntimeError as exc:
        if not any(sign in str(exc) for sign in OUT_OF_MEMORY):  # the rows above still stand
            result["full_peak_memory_error"] = str(exc).strip().splitlines()[-1][:500]
            return result
        result["full_peak_memory_bytes"] = full_memory_extrapolated(recipe, m2pt)
        result["full_peak_memory_extrapolated"] = True
        result["full_peak_memory_note"] = (
            "full finetuning ran out of memory; a lower bound: m2pt's measured peak plus a gradient and "
            "AdamW's two moments, in the weights' dtype, for each weight full finetuning trains and m2pt "
            "does not (AdamW's temporaries left out)"
        )
    return result


OUT_OF_MEMORY = ("out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")  # in a probe's stderr


def full_memory_extrapolated(recipe: Path, m2pt_row: dict[str, Any]) -> int:
    """A lower bound of full finetuning's peak memory from m2pt's: a gradient and two AdamW moments, in
    the weights' dtype, for each weight full finetuning trains that m2pt does not (both models counted
    on the meta device, nothing allocated)."""
    from m2pt_cli.loading import build

    def trained(method: str) -> dict[str, Any]:
        skeleton, _ = build(method_recipe(recipe, method, ()), empty=True)
        return {name: p for name, p in skeleton.named_parameters() if p.requires_grad}

    m2pt_trained = trained("m2pt")
    only_full = [p for name, p in trained("full").items() if name not in m2pt_trained]
    return int(m2pt_row["peak_memory_bytes"] + sum(3 * p.element_size() * p.numel() for p in only_full))


def _quantized(plan: Plan, device: str) -> dict[str, Any]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (pip install 'm2pt[quantization]')"}
    batch, seq = plan.bench_shapes or (None, None)
    recipe = resolve(plan.bench_recipe)
    return run(
        recipe, QUANTIZED, (), plan.steps, plan.warmup, batch, seq, device, prompt_path=False, eval_batch_size=None
    )


def _serving(plan: Plan, device: str) -> dict[str, Any]:
    """An adapter of the bench recipe (its prompts as initialized), served by ``m2pt serve``."""
    with tempfile.TemporaryDirectory(prefix="m2pt-suite-") as folder:
        adapter = write_untrained_adapter(resolve(plan.bench_recipe), Path(folder) / "adapter", device)
        log = Path(folder) / "serve.log"
        with serving(adapter, device, log, max_batch_size=max(CONCURRENCY), queue_size=4 * max(CONCURRENCY)) as url:
            bodies = noise_requests(plan.serve_max_tokens)
            result: dict[str, Any] = {"serve_max_tokens": plan.serve_max_tokens}
            for clients in CONCURRENCY:
                measured = requests_per_second(url, (clients,), plan.serve_requests(clients), bodies, plan.serve_rounds)
                result[f"serve_requests_c{clients}"] = measured.pop("serve_requests")
                result.update(measured)
            result.update(time_to_first_token(url, bodies, plan.ttft_requests))
    return result


def write_untrained_adapter(recipe_path: Path, folder: Path, device: str) -> Path:
    """The recipe's m2pt adapter as built (prompts at their initialization), written as training writes it."""
    from m2pt_cli import adapter as adapter_files
    from m2pt_cli import config as recipe_config
    from m2pt_cli.loading import build
    from m2pt_cli.trainer import adapter_meta

    recipe = method_recipe(recipe_path, "m2pt", ())
    model, _ = build(recipe, device=device)
    state = model.adapter_state_dict()
    extra = {adapter_files.RECIPE: recipe_config.dump(recipe)}
    written = adapter_files.write_adapter(folder, state, adapter_meta(recipe, model), extra_files=extra)
    del model, state
    release(device)  # the server is another process: leave it the memory
    return written


GOALS = (
    # (name, what, target, at most (True) or at least)
    ("m2pt_over_floor", "m2pt / floor step time", 1.05, True),
    ("m2pt_over_lora", "m2pt / LoRA step time", 1.0, True),
    ("m2pt_over_full_memory", "m2pt / full finetuning peak memory", 0.3, True),
    ("decode_ratio", "decode tokens/s with / without prompts", 0.97, False),
)


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against what was measured; ``met`` None where a step did not measure it."""
    training = report["steps"].get("training", {})
    rows = {r["method"]: r for r in training.get("rows", [])}
    values: dict[str, float | None] = {"m2pt_over_floor": training.get("m2pt_over_floor")}
    values["decode_ratio"] = training.get("decode_ratio")
    if "m2pt" in rows and "lora" in rows:
        values["m2pt_over_lora"] = rows["m2pt"]["step_seconds_median"] / rows["lora"]["step_seconds_median"]
    if "full_peak_memory_bytes" in training and "peak_memory_bytes" in rows.get("m2pt", {}):
        values["m2pt_over_full_memory"] = rows["m2pt"]["peak_memory_bytes"] / training["full_peak_memory_bytes"]
    found = []
    for name, what, target, at_most in GOALS:
        value = values.get(name)
        met = None if value is None else (value <= target if at_most else value >= target)
        found.append({"goal": name, "what": what, "value": value, "target": target, "at_most": at_most, "met": met})
    return found


def failures(report: dict[str, Any]) -> list[str]:
    """Steps that raised, and a parity check out of tolerance: the suite's exit status."""
    failed = [f"{name}: {step['error']}" for name, step in report["steps"].items() if "error" in step]
    parity = report["steps"].get("parity", {})
    for row in parity.get("variants", []):
        if not row["ok"]:
            failed.append(f"parity: {row['device']}/{row['dtype']}/{row['attention']} is outside its tolerance")
    return failed


def suite_markdown(report: dict[str, Any]) -> str:
    """The report as the tables docs/performance.md shows."""
    plan = report["plan"]
    setting = (
        "the paper's shape: LLaVA-1.5-7B at full depth"
        if plan["paper_shape"]
        else "tiny shapes (the demo model): the steps are exercised; the goals are for the paper's shape on a GPU"
    )
    lines = [
        f"`m2pt bench --suite gpu` on {report['hardware']} ({report['device']}), {report['date']}: {setting}",
        "",
        "| goal | measured | target | met |",
        "|---|---|---|---|",
    ]
    for goal in report["goals"]:
        value = "n/a" if goal["value"] is None else f"{goal['value']:.3f}"
        met = {None: "n/a", True: "yes", False: "no"}[goal["met"]]
        lines.append(f"| {goal['what']} | {value} | {'<=' if goal['at_most'] else '>='} {goal['target']} | {met} |")
    steps = report["steps"]
    sections = {
        "parity": _parity_lines,
        "training": _training_lines,
        "quantized": _quantized_lines,
        "serving": _serving_lines,
    }
    for name, lines_of in sections.items():
        if name in steps:  # a report written part-way holds the steps run so far
            lines += ["", *lines_of(steps[name])]
    if report["failed"]:
        lines += ["", "Failed:", *[f"- {line}" for line in report["failed"]]]
    return "\n".join(lines) + "\n"


def _seconds(step: dict[str, Any]) -> str:
    return f"{step['seconds']:.0f} s"


def _parity_lines(step: dict[str, Any]) -> list[str]:
    if "error" in step:
        return [f"Parity: failed ({step['error']})"]
    lines = [
        f"Parity against {step['reference']} attention ({_seconds(step)}):",
        "",
        "| device | dtype | attention | loss rel. error | logits RMS / spread | least gradient cosine "
        "| greedy tokens agree | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in step["variants"]:
        lines.append(
            f"| {r['device']} | {r['dtype']} | {r['attention']} | {r['loss_relative_error']:.1e} | "
            f"{r['logits_rms_error_over_spread']:.1e} | {r['least_gradient_cosine']:.5f} | "
            f"{'yes' if r['greedy_tokens_agree'] else 'no'} | {'yes' if r['ok'] else 'NO'} |"
        )
    half = next((r["tolerance"] for r in step["variants"] if r["dtype"] != "float32"), None)
    if half:
        lines.append(
            f"- half precision is held to {HALF_MARGIN:g}x the error of {step['yardstick']['variant']} (the format's "
            f"own noise): loss <= {half['loss']:.1e}, logits <= {half['logits']:.2f}, cosine >= "
            f"{half['gradient_cosine']:.4f}"
        )
    return lines


def _training_lines(step: dict[str, Any]) -> list[str]:
    if "error" in step:
        return [f"Training step: failed ({step['error']})"]
    full = step.get("full_peak_memory_bytes")
    how = "did not fit: a lower bound, extrapolated" if step.get("full_peak_memory_extrapolated") else "measured"
    if "full_peak_memory_error" in step:
        full, how = None, step["full_peak_memory_error"]
    return [
        f"Training step ({_seconds(step)}):",
        "",
        markdown(step).rstrip(),
        f"- full finetuning peak memory: {full / 2**20:.0f} MiB ({how})" if full else f"- full finetuning: n/a ({how})",
    ]


def _quantized_lines(step: dict[str, Any]) -> list[str]:
    if "error" in step:
        return [f"Quantized bases: failed ({step['error']})"]
    if "skipped" in step:
        return [f"Quantized bases: skipped ({step['skipped']})"]
    return [f"Quantized bases ({_seconds(step)}):", "", markdown(step).rstrip()]


def _serving_lines(step: dict[str, Any]) -> list[str]:
    if "error" in step:
        return [f"Serving: failed ({step['error']})"]
    lines = [
        f"`m2pt serve` on loopback, at most {step['serve_max_tokens']} new tokens per answer, median of "
        f"{step['serve_rounds']} rounds ({_seconds(step)}):",
        "",
        "| concurrent clients | requests | requests/s | rows per batch |",
        "|---|---|---|---|",
    ]
    for clients in CONCURRENCY:
        lines.append(
            f"| {clients} | {step[f'serve_requests_c{clients}']} | {step[f'serve_rps_c{clients}']:.2f} | "
            f"{step[f'serve_rows_per_batch_c{clients}']:.1f} |"
        )
    lines.append(
        f"- time to the first streamed token, {step['ttft_requests']} requests one at a time: median "
        f"{step['ttft_ms_median']:.0f} ms, 90th percentile {step['ttft_ms_p90']:.0f} ms"
    )
    return lines
