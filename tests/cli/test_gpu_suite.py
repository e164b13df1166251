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
    assert 0 < steps["serving"]["ttft_ms_median"] <= steps["serving"]["ttft_ms_p90"]
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


def test_a_kernel_that_drops_only_the_padding_mask_fails_parity(monkeypatch):
    """Causal attention kept, the padding mask lost: only the left-padded rows (as evaluation and
    serving pad) can show it, and they do."""
    real = torch.nn.functional.scaled_dot_product_attention

    def no_padding_mask(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if attn_mask is not None and query.shape[-2] == key.shape[-2]:  # a padded forward over the whole row
            attn_mask, is_causal = None, True
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_padding_mask)
    broken = check_parity(resolve("demo"), (), Shapes(3, 48), "cpu")
    float32_sdpa = next(v for v in broken["variants"] if (v["dtype"], v["attention"]) == ("float32", "sdpa"))
    assert not float32_sdpa["ok"] and float32_sdpa["logits_rms_error_over_spread"] > 0.05


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


def test_full_finetuning_memory_is_extrapolated_from_what_full_trains_and_m2pt_does_not():
    from m2pt_cli.benchmark import build_method

    recipe = resolve("demo")
    trained = {}
    for method in ("m2pt", "full"):
        model, _, _ = build_method(recipe, method, (), "cpu")
        trained[method] = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    only_full = sum(n for name, n in trained["full"].items() if name not in trained["m2pt"])
    assert 0 < only_full < sum(trained["full"].values())  # the projector is trained by both
    row = {"trainable_parameters": sum(trained["m2pt"].values()), "peak_memory_bytes": 10_000_000}
    # float32 weights: a 4-byte gradient and two 4-byte AdamW moments each
    assert full_memory_extrapolated(recipe, row) == 10_000_000 + 12 * only_full


def _training_with(monkeypatch, probe_error: str):
    """The training step with the methods' run stubbed and full finetuning's probe failing."""
    from m2pt_cli.benchmark import suite

    rows = [{"method": "m2pt", "step_seconds_median": 1.0, "peak_memory_bytes": 10_000_000, "trainable_parameters": 1}]
    monkeypatch.setattr(suite, "run", lambda *args, **kwargs: {"batch_size": 2, "seq_len": 64, "rows": rows})

    def probe(recipe, method, *args):
        assert method == "full"
        raise RuntimeError(f"memory probe for full failed:\n{probe_error}")

    monkeypatch.setattr(suite, "peak_memory_child", probe)
    return suite._training(suite.plan_for("cpu"), "cpu")


def test_full_finetuning_out_of_memory_is_extrapolated_and_marked(monkeypatch):
    result = _training_with(monkeypatch, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.2 GiB")
    assert result["full_peak_memory_extrapolated"] is True and "lower bound" in result["full_peak_memory_note"]
    row = result["rows"][0]
    assert result["full_peak_memory_bytes"] == full_memory_extrapolated(resolve("demo"), row) > 10_000_000


def test_another_failure_of_the_full_probe_keeps_the_methods_rows(monkeypatch):
    result = _training_with(monkeypatch, "Segmentation fault (core dumped)")
    assert result["full_peak_memory_error"] == "Segmentation fault (core dumped)"
    assert "full_peak_memory_bytes" not in result and result["rows"][0]["method"] == "m2pt"
    judged = {g["goal"]: g["met"] for g in goals({"steps": {"training": result}})}
    assert judged["m2pt_over_full_memory"] is None


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
        (
            ["bench", "--suite", "gpu", "--output", "s.json", "--steps", "3"],
            "--suite runs its own plan; leave out --steps",
        ),
        (["bench", "--suite", "gpu", "--output", "s.json", "--no-memory"], "leave out --no-memory (it takes --device)"),
    ],
)
def test_suite_arguments_are_one_line_errors(tmp_path, args, needle):
    refused(args, tmp_path, needle, cwd=tmp_path)
