"""``m2pt bench`` end to end on the tiny recipe: every field written, ratios from the same run."""

from __future__ import annotations

import json
import re

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


@pytest.mark.slow
def test_bench_writes_every_field(tiny_recipe, tmp_path):
    """Every field but peak memory (a child process per method: tests/cli/test_gpu_suite.py runs the
    probes of m2pt, LoRA, the floors and full finetuning through the same code)."""
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
        "--no-memory",
    )
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["rows"]] == list(METHODS)
    rows = {r["method"]: r for r in report["rows"]}
    for row in rows.values():
        assert set(row) == ROW_FIELDS - {"peak_memory_bytes"}
        assert row["step_seconds_p10"] <= row["step_seconds_median"] <= row["step_seconds_p90"]
        assert row["ratio_to_m2pt"] == pytest.approx(row["step_seconds_median"] / rows["m2pt"]["step_seconds_median"])
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
    assert report["eval_batch_size"] == report["eval_samples"] == 8 and report["eval_max_new_tokens"] > 0
    assert report["eval_batch_speedup"] == pytest.approx(
        report["eval_samples_per_second_batch_default"] / report["eval_samples_per_second_batch_1"]
    )
    assert report["eval_answers_agree"] is True  # batching does not change a greedy answer
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(METHODS) + 1 and "m2pt / limit" in table and "m2pt / floor" in table
    assert "prefill excluded" in table and "at batch 8" in table
    assert table.startswith(f"`m2pt bench {tiny_recipe}` on ")  # a recipe file is named by its path


@pytest.mark.slow  # two bench runs
def test_bench_parts_can_be_left_out(tiny_recipe, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--steps", "1", "--warmup", "0", "--methods", "m2pt", "--seq-len", "40", "--output", out]
    m2pt("bench", tiny_recipe, *args, "--no-memory", "--no-prompt-path", "--no-eval", "--device", "cpu")
    report = json.loads(out.read_text())
    assert not any(key.startswith(("eval_", "decode_", "forward_")) for key in report)
    assert "peak_memory_bytes" not in report["rows"][0]
    m2pt("bench", tiny_recipe, *args, "--no-memory", "--no-prompt-path", "--eval-batch-size", "3", "--device", "cpu")
    report = json.loads(out.read_text())
    assert report["eval_batch_size"] == 3 and "decode_ratio" not in report


def test_eval_throughput_answers_through_the_one_generation_path(tiny_recipe, monkeypatch):
    """Every answer comes from ``generate_answers`` (no second ``model.generate``): a warm-up per
    batch size, then the same samples one at a time and as one batch."""
    from m2pt_cli import answering
    from m2pt_cli.benchmark import build_method, eval_throughput, method_recipe

    model, processor, _ = build_method(tiny_recipe, "m2pt", (), "cpu")
    sizes, original = [], answering.generate_answers

    def counted(model, processor, backbone, images, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return original(model, processor, backbone, images, prompts, *args, **kwargs)

    monkeypatch.setattr(answering, "generate_answers", counted)
    report = eval_throughput(model, processor, method_recipe(tiny_recipe, "m2pt", ()), 4, 3, 1, "cpu")
    assert sizes == [1, 4, 1, 1, 1, 1, 4]
    assert report["eval_answers_agree"] is True and report["eval_samples"] == 4
    assert model.training  # the evaluation path hands the model back in the mode it found it


def test_eval_batch_size_default_is_m2pt_evals():
    from click.testing import CliRunner

    from m2pt_cli.benchmark import EVAL_BATCH_SIZE
    from m2pt_cli.cli import cli
    from m2pt_cli.evaluate import EvalSettings

    help_text = CliRunner().invoke(cli, ["bench", "--help"]).output
    eval_help = CliRunner().invoke(cli, ["eval", "--help"]).output
    assert EVAL_BATCH_SIZE == EvalSettings().batch_size == 8
    assert "--eval-batch-size INTEGER RANGE" in help_text and "[default: 8;" in help_text
    assert re.search(r"--batch-size INTEGER RANGE\s+\[default: 8;", eval_help)


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


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--curve", "depth=1,2"], "is not AXIS=V1,V2,... with AXIS one of prompt, seq"),
        (["--curve", "prompt=0,five"], "holds a value that is not a whole number"),
        (["--curve", "prompt=-5,5"], "needs at least two values, each at least 0"),
        (["--curve", "seq=128"], "needs at least two values, each at least 8"),
        (["--curve", "prompt=0,5", "--curve", "prompt=10,20"], "each axis once"),
        (["--curve", "prompt=0,5"], "give --output FILE.json"),
    ],
)
def test_bad_curves_are_one_line_errors(tiny_recipe, tmp_path, args, needle):
    out = [] if "--output" in args or needle.startswith("give") else ["--output", tmp_path / "c.json"]
    result = m2pt("bench", tiny_recipe, *args, *out, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("m2pt: ")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_curve_points_take_turns_and_set_what_they_name(tiny_recipe, monkeypatch):
    """The prompt curve changes the LLM's prompt length at a fixed batch, the seq curve the tokens
    per row at the recipe's prompt length; the points take turns step by step."""
    from m2pt_cli import benchmark
    from m2pt_cli.benchmark import timing

    seen = []
    original = timing.train_step

    def recording(model, optimizer, batch):
        seen.append((model.m2pt_config.text_length, batch["input_ids"].shape[1]))
        return original(model, optimizer, batch)

    monkeypatch.setattr(timing, "train_step", recording)
    shapes = benchmark.Shapes(2, 40)
    prompt = benchmark.curve(tiny_recipe, "prompt", [0, 2, 4], (), 2, 0, shapes, "cpu", memory=False)
    assert seen == [(0, 40), (2, 40), (4, 40)] * 2
    assert [p["tokens_added"] for p in prompt["points"]] == [0, 2, 4] and prompt["setting"] == "prompts.text.length"
    seen.clear()
    seq = benchmark.curve(tiny_recipe, "seq", [40, 56], (), 1, 1, shapes, "cpu", memory=False)
    assert seen == [(3, 40), (3, 56)] * 2  # one warm-up round, then the timed one
    medians = [p["step_seconds_median"] for p in seq["points"]]
    assert seq["slope_seconds_per_token"] == pytest.approx((medians[1] - medians[0]) / 16)


@pytest.mark.slow  # a process per point
def test_curves_write_report_table_and_plot(tiny_recipe, tmp_path):
    out = tmp_path / "curves.json"
    args = ["--curve", "prompt=0,2,4", "--curve", "seq=40,56", "--steps", "1", "--warmup", "0", "--batch-size", "2"]
    m2pt("bench", tiny_recipe, *args, "--seq-len", "40", "--output", out, "--device", "cpu")
    report = json.loads(out.read_text())
    prompt, seq = report["curves"]["prompt"], report["curves"]["seq"]
    assert [p["value"] for p in prompt["points"]] == [0, 2, 4] and [p["value"] for p in seq["points"]] == [40, 56]
    assert all(p["peak_memory_bytes"] > 0 for p in prompt["points"] + seq["points"])
    assert report["prompt_over_text_slope"] == pytest.approx(
        prompt["slope_seconds_per_token"] / seq["slope_seconds_per_token"]
    )
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| prompt (prompts.text.length) |") == 3 and table.count("\n| seq (--seq-len) |") == 2
    assert "per prompt token / per text token" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.json", "curves.md", "curves.png"]


def test_bench_7b_wide_has_llava_7b_shapes_with_two_layers_per_tower():
    """The bundled recipe holds LLaVA-1.5-7B's widths, heads, image and vocabulary, the paper's prompt
    and sequence lengths, and two layers per tower (``m2pt info`` builds it on the meta device)."""
    from m2pt_cli import config as recipe_config
    from m2pt_cli.recipes import folder, resolve

    report = json.loads(m2pt("info", "bench-7b-wide", "--json").stdout)
    assert report["vision"]["width"] == 1024 and report["text"]["width"] == 4096
    assert report["vision"]["layers"] == report["text"]["layers"] == 2
    assert report["vision"]["prompt_length"] == report["text"]["prompt_length"] == 10
    assert report["vision"]["unused_layers"] == [1]  # LLaVA reads layer -2
    config = json.loads((folder() / "bench-7b-wide" / "model" / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["num_attention_heads"], text["intermediate_size"], text["vocab_size"]) == (32, 11008, 32000)
    assert (vision["num_attention_heads"], vision["intermediate_size"]) == (16, 4096)
    assert (vision["image_size"] // vision["patch_size"]) ** 2 + 1 == 577
    recipe = recipe_config.load(resolve("bench-7b-wide"), ())
    assert recipe.data.max_length == 1024 and recipe.model.weights == "random"
    processor = json.loads((folder() / "bench-7b-wide" / "model" / "processor_config.json").read_text())
    assert processor["patch_size"] == 14 and processor["image_processor"]["crop_size"]["height"] == 336


@pytest.mark.slow  # inductor compiles the tiny model's forward and backward with the C++ compiler
def test_bench_compile_times_compiled_and_eager_side_by_side(tiny_recipe, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--steps", "2", "--warmup", "0", "--methods", "m2pt", "--seq-len", "40", "--batch-size", "2"]
    m2pt("bench", tiny_recipe, *args, "--compile", "--no-memory", "--no-prompt-path", "--no-eval", "--output", out)
    report = json.loads(out.read_text())
    eager, compiled = report["rows"]
    assert (eager["method"], compiled["method"]) == ("m2pt", "m2pt+compiled") and "compiled" not in eager
    assert compiled["compiled_over_eager"] == pytest.approx(
        compiled["step_seconds_median"] / eager["step_seconds_median"]
    )
    assert compiled["trainable_parameters"] == eager["trainable_parameters"]  # the same model
    assert compiled["compile_seconds"] > 0 and compiled["graphs"] >= compiled["graph_breaks"] + 1
    assert compiled["graph_breaks_in_layers"] == 0, compiled["graph_break_reasons"]
    table = out.with_suffix(".md").read_text()
    assert "| m2pt+compiled |" in table and "m2pt compiled / eager step time: " in table
    assert "0 inside the encoder and decoder layers" in table


@pytest.mark.bad_input
def test_compile_with_curve_is_a_one_line_error(tiny_recipe, tmp_path):
    result = m2pt(
        "bench", tiny_recipe, "--compile", "--curve", "prompt=0,2", "--output", tmp_path / "c.json", check=False
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("m2pt: ")]
    assert len(lines) == 1 and "does not combine with --curve" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_bench_7b_full_is_llava_7b_at_full_depth_in_bf16():
    """The GPU paper-shape recipe: bench-7b-wide's widths with every layer (24 + 32), 7.06 B parameters
    in bf16 (14.1 GB of weights), batch 4 x 1024 with gradient checkpointing (built on the meta device)."""
    from m2pt_cli import config as recipe_config
    from tests.conftest import REPO

    path = REPO / "recipes" / "bench-7b-full.yaml"
    report = json.loads(m2pt("info", path, "--json").stdout)
    assert (report["vision"]["layers"], report["text"]["layers"]) == (24, 32)
    assert report["vision"]["width"] == 1024 and report["text"]["width"] == 4096
    assert report["vision"]["unused_layers"] == [23]  # LLaVA reads layer -2
    assert report["total_parameters"] == 7_064_449_024 and report["dtype"] == "bfloat16"
    assert report["weight_bytes"]["none"] == pytest.approx(2 * report["total_parameters"], rel=1e-3)
    recipe = recipe_config.load(path, ())
    t = recipe.train
    assert (t.per_device_batch_size, recipe.data.max_length, t.gradient_checkpointing) == (4, 1024, True)
    assert recipe.model.weights == "random" and t.precision == "bf16"
    wide = json.loads((REPO / "recipes" / "bench-7b-wide" / "model" / "config.json").read_text())
    full = json.loads((REPO / "recipes" / "bench-7b-full" / "model" / "config.json").read_text())
    for tower in ("text_config", "vision_config"):  # the same shapes, only deeper
        wide[tower].pop("num_hidden_layers"), full[tower].pop("num_hidden_layers")
    assert {**wide, "dtype": "bfloat16"} == full
