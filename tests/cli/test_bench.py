"""``m2pt bench`` end to end on the tiny recipe: every field written, ratios from the same run."""

from __future__ import annotations

import json

import pytest

from m2pt_cli.benchmark import METHODS
from tests.helpers import m2pt

ROW_FIELDS = {
    "method",
    "step_seconds_median",
    "step_seconds_p10",
    "step_seconds_p90",
    "ratio_to_m2pt",
    "peak_memory_bytes",
    "trainable_parameters",
    "optimizer_state_bytes",
    "adapter_bytes",
}


def test_bench_writes_every_field(tiny_recipe, tmp_path):
    out = tmp_path / "bench.json"
    m2pt(
        "bench",
        tiny_recipe,
        "--steps",
        "2",
        "--warmup",
        "0",
        "--methods",
        ",".join(METHODS),
        "--batch-size",
        "2",
        "--seq-len",
        "40",
        "--output",
        out,
        "--device",
        "cpu",
    )
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["rows"]] == list(METHODS)
    rows = {r["method"]: r for r in report["rows"]}
    for row in rows.values():
        assert set(row) == ROW_FIELDS
        assert row["step_seconds_p10"] <= row["step_seconds_median"] <= row["step_seconds_p90"]
        assert row["ratio_to_m2pt"] == pytest.approx(row["step_seconds_median"] / rows["m2pt"]["step_seconds_median"])
        assert row["peak_memory_bytes"] > 0
    assert rows["m2pt"]["ratio_to_m2pt"] == 1.0
    assert rows["limit"]["trainable_parameters"] == 0 and rows["limit"]["optimizer_state_bytes"] == 0
    # tiny recipe: 3 x 3 x 32 visual + 4 x 3 x 64 text prompts + the projector
    projector = (32 * 64 + 64) + (64 * 64 + 64)
    assert rows["m2pt"]["trainable_parameters"] == 3 * 3 * 32 + 4 * 3 * 64 + projector
    assert rows["text-only"]["trainable_parameters"] == 4 * 3 * 64 + projector
    # AdamW: two fp32 moments per value and a fp32 step counter per tensor (6: two prompts, 4 projector)
    assert rows["m2pt"]["optimizer_state_bytes"] == 2 * 4 * rows["m2pt"]["trainable_parameters"] + 4 * 6
    assert rows["full"]["trainable_parameters"] > rows["lora"]["trainable_parameters"] > 0
    assert report["m2pt_over_limit"] == pytest.approx(
        rows["m2pt"]["step_seconds_median"] / rows["limit"]["step_seconds_median"]
    )
    for key in ("forward_ratio", "token_ratio", "decode_ratio", "decode_tokens_per_second_with_prompts"):
        assert report[key] > 0
    assert report["token_ratio"] > 1
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(METHODS) + 1 and "m2pt / limit" in table
