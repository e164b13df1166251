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
    for frozen in ("floor", "limit"):
        assert rows[frozen]["trainable_parameters"] == 0 and rows[frozen]["optimizer_state_bytes"] == 0
    # tiny recipe: 3 x 3 x 32 visual + 4 x 3 x 64 text prompts + the projector
    projector = (32 * 64 + 64) + (64 * 64 + 64)
    assert rows["m2pt"]["trainable_parameters"] == 3 * 3 * 32 + 4 * 3 * 64 + projector
    assert rows["text-only"]["trainable_parameters"] == 4 * 3 * 64 + projector
    # AdamW: two fp32 moments per value and a fp32 step counter per tensor (6: two prompts, 4 projector)
    assert rows["m2pt"]["optimizer_state_bytes"] == 2 * 4 * rows["m2pt"]["trainable_parameters"] + 4 * 6
    assert rows["full"]["trainable_parameters"] > rows["lora"]["trainable_parameters"] > 0
    for frozen in ("floor", "limit"):
        assert report[f"m2pt_over_{frozen}"] == pytest.approx(
            rows["m2pt"]["step_seconds_median"] / rows[frozen]["step_seconds_median"]
        )
    for key in ("forward_ratio", "token_ratio", "decode_ratio", "decode_tokens_per_second_with_prompts"):
        assert report[key] > 0
    assert report["token_ratio"] > 1
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(METHODS) + 1 and "m2pt / limit" in table and "m2pt / floor" in table


@pytest.mark.parametrize(("method", "through_vision"), [("floor", True), ("limit", False), ("m2pt", True)])
def test_floor_back_propagates_through_the_vision_tower_and_limit_does_not(tiny_recipe, method, through_vision):
    """What each row pays for: a gradient reaches the vision encoder's first block input under
    ``floor`` (and M2PT, whose visual prompts sit there), not under ``limit``; no weight gets one."""
    from m2pt_cli.benchmark import Shapes, build_method, synthetic_batch, train_step

    model, processor, optimizer = build_method(tiny_recipe, method, (), "cpu")
    seen = []
    first_block = model.backbone.vision_tower(model.base).blocks[0]
    first_block.register_forward_hook(lambda module, args, output: seen.append(output))
    train_step(model, optimizer, synthetic_batch(model, processor, Shapes(2, 48), "cpu"))
    out = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    assert out.requires_grad == through_vision
    if method != "m2pt":
        assert all(p.grad is None for p in model.base.parameters())
