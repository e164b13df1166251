"""``m2pt bench --suite gpu``: on CPU it runs every step on the demo model (so the GPU script cannot
rot), its parity check catches a kernel that attends where it must not, and its goals, failures and
full-finetuning extrapolation follow from what was measured."""

from __future__ import annotations

import json

import pytest
import torch

from m2pt_cli.benchmark.methods import Shapes
from m2pt_cli.benchmark.parity import check_parity
from m2pt_cli.benchmark.suite import CONCURRENCY, failures, full_memory_extrapolated, goals
from m2pt_cli.recipes import resolve
from tests.helpers import m2pt, refused


@pytest.mark.slow  # four steps: parity, four methods and their memory probes, quantized bases, a server
def test_the_suite_runs_every_step_on_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "suite.json"
    result = m2pt("bench", "--suite", "gpu", "--output", out, "--device", "cpu", process=True)
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["device"] == "cpu"
    steps = report["steps"]
    assert not [name for name, step in steps.items() if "error" in step]
    variants = {(v["dtype"], v["attention"]) for v in steps["parity"]["variants"]}
    assert variants == {
        ("float32", "sdpa"),
        ("bfloat16", "eager"),
        ("bfloat16", "sdpa"),
        ("float32+autocast-bf16", "sdpa"),
    }
    assert all(v["ok"] and v["trained_tensors"] > 0 for v in steps["parity"]["variants"])
    rows = {r["method"]: r for r in steps["training"]["rows"]}
    assert list(rows) == ["m2pt", "lora", "floor", "limit"]
    assert all(r["peak_memory_bytes"] > 0 for r in rows.values())
    assert steps["training"]["full_peak_memory_extrapolated"] is False  # the demo model fits
    assert steps["training"]["full_peak_memory_bytes"] > rows["m2pt"]["peak_memory_bytes"]
    for clients in CONCURRENCY:
        assert steps["serving"][f"serve_rps_c{clients}"] > 0
    assert steps["serving"]["serve_rows_per_batch_c8"] > 1  # concurrent requests were answered together
    measured = {g["goal"]: g for g in report["goals"]}
    assert measured["m2pt_over_floor"]["value"] == pytest.approx(steps["training"]["m2pt_over_floor"])
    assert all(g["met"] is not None for g in measured.values())
    table = out.with_suffix(".md").read_text()
    assert report["hardware"] in table and "tiny shapes" in table
    assert table in result.stdout


def _attends_everywhere(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """A broken kernel: no causal mask, no padding mask (what a mask dropped on the way looks like)."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the key and value heads
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    return torch.softmax(query @ key.transpose(-1, -2) * scale, dim=-1) @ value


def test_parity_holds_for_the_real_kernels_and_fails_for_one_that_ignores_the_mask(monkeypatch):
    recipe = resolve("demo")
    honest = check_parity(recipe, (), Shapes(3, 48), "cpu")
    assert honest["ok"], honest
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _attends_everywhere)
    broken = check_parity(recipe, (), Shapes(3, 48), "cpu")
    by_kernel = {(v["dtype"], v["attention"]): v for v in broken["variants"]}
    assert not broken["ok"]
    assert not any(by_kernel[dtype, "sdpa"]["ok"] for dtype in ("float32", "bfloat16", "float32+autocast-bf16"))
    assert by_kernel["bfloat16", "eager"]["ok"]  # eager attention does not call the patched kernel
    assert (
        by_kernel["float32", "sdpa"]["logits_rms_error_over_spread"]
        > 100 * honest["variants"][0]["tolerance"]["logits"]
    )


def test_full_finetuning_memory_is_extrapolated_from_m2pt_peak_and_the_frozen_weights():
    from m2pt_cli import config as recipe_config
    from m2pt_cli.loading import build

    recipe = resolve("demo")
    model, _ = build(recipe_config.load(recipe, ()), device="cpu")
    weights = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"trainable_parameters": trainable, "peak_memory_bytes": 10_000_000}
    # float32 weights: a 4-byte gradient and two 4-byte AdamW moments per weight m2pt leaves frozen
    assert full_memory_extrapolated(recipe, row) == 10_000_000 + 12 * (weights - trainable)


def _report(m2pt_seconds=1.0, lora_seconds=1.2, floor_ratio=1.02, decode=0.99, parity_ok=True, error=None):
    rows = [
        {"method": "m2pt", "step_seconds_median": m2pt_seconds, "peak_memory_bytes": 20},
        {"method": "lora", "step_seconds_median": lora_seconds, "peak_memory_bytes": 25},
    ]
    training = {"rows": rows, "m2pt_over_floor": floor_ratio, "decode_ratio": decode, "full_peak_memory_bytes": 100}
    parity = {"variants": [{"device": "cuda", "dtype": "bfloat16", "attention": "sdpa", "ok": parity_ok}]}
    steps = {"parity": parity, "training": training, "serving": {"error": error} if error else {}}
    return {"steps": steps}


def test_goals_are_judged_from_the_measured_figures():
    judged = {g["goal"]: (g["value"], g["met"]) for g in goals(_report())}
    assert judged == {
        "m2pt_over_floor": (1.02, True),
        "m2pt_over_lora": (pytest.approx(1.0 / 1.2), True),
        "m2pt_over_full_memory": (0.2, True),
        "decode_ratio": (0.99, True),
    }
    missed = {g["goal"]: g["met"] for g in goals(_report(m2pt_seconds=1.3, floor_ratio=1.2, decode=0.9))}
    assert missed == {
        "m2pt_over_floor": False,
        "m2pt_over_lora": False,
        "m2pt_over_full_memory": True,
        "decode_ratio": False,
    }
    unmeasured = goals({"steps": {"training": {"error": "OutOfMemoryError: ..."}}})
    assert [g["met"] for g in unmeasured] == [None] * 4


def test_failures_are_steps_that_raised_and_parity_out_of_tolerance():
    assert failures(_report()) == []
    assert failures(_report(parity_ok=False, error="RuntimeError: m2pt serve did not start")) == [
        "serving: RuntimeError: m2pt serve did not start",
        "parity: cuda/bfloat16/sdpa is outside its tolerance",
    ]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bench", "--suite", "gpu"], "--suite: give --output FILE.json"),
        (
            ["bench", "demo", "--suite", "gpu", "--output", "s.json"],
            "--suite chooses its own recipes; leave out RECIPE",
        ),
        (["bench"], "give a RECIPE (a YAML file or a bundled recipe's name), or --suite gpu"),
    ],
)
def test_suite_arguments_are_one_line_errors(tmp_path, args, needle):
    refused(args, tmp_path, needle, cwd=tmp_path)
