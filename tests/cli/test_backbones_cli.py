"""Every backbone through the same commands: train a few steps, evaluate, export, load, generate."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from PIL import Image

import m2pt_cli
from m2pt_cli.chat import question_prompt
from tests.cases import build_case
from tests.helpers import adapter, greedy_without_cache, m2pt

pytestmark = pytest.mark.slow  # train, eval, export and generate on every backbone

TRAIN = {
    "data": {"sources": [{"format": "digits", "limit": 40}], "eval_size": 8, "max_length": 400},
    "train": {
        "max_steps": 3,
        "learning_rate": 5e-3,
        "global_batch_size": 4,
        "per_device_batch_size": 4,
        "precision": "fp32",
        "gradient_checkpointing": True,
        "logging_steps": 1,
        "save_steps": 3,
        "eval_samples": 4,
        "eval_max_new_tokens": 2,
    },
}
QUESTION = "What digit is this?"


@pytest.mark.parametrize("name", ["instructblip", "openclip_vicuna"])
def test_train_eval_export_load_generate(name, tiny_models, tmp_path):
    case = build_case(name, tmp_path, tiny_models)
    recipe = {**yaml.safe_load(case.recipe.read_text()), **TRAIN}
    recipe_path = tmp_path / f"{name}-train.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    train_result = m2pt("train", recipe_path, "--output-dir", run)
    lines = [line for line in train_result.stderr.splitlines() if "data: " in line]
    # each once, even after open_clip's module-level logging calls set up the root logger
    assert len(lines) == 3 and "data: 40 records, 40 usable, 32 train, 8 held out" in lines, lines
    assert re.match(r"data: data.sources\[0\]: 40 records (encoded in|from the cache)", lines[0]), lines
    assert lines[2].startswith("data: tokens per record: min "), lines
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics) and any("after_accuracy" in m for m in metrics)

    m2pt("eval", "--bench", "demo", "--adapter", run, "--limit", "4", "--output-dir", tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model"]["backbone"] == case.backbone_name and "demo" in results["metrics"]
    if name == "openclip_vicuna":
        assert results["model"]["vision_tower"] == recipe["model"]["vision_tower"]

    out = tmp_path / "export"
    m2pt("export", run, "--format", "safetensors", "--output", out)
    model, processor = m2pt_cli.load(out)
    trained = adapter(run)
    assert set(trained) == set(model.adapter_state_dict())
    for key, value in trained.items():
        assert torch.equal(model.adapter_state_dict()[key], value), key

    image = tmp_path / "digit.png"
    Image.new("RGB", (8, 8), "white").save(image)
    result = m2pt("generate", "--adapter", out, "--image", image, "--prompt", QUESTION, "--max-new-tokens", "4")
    text = question_prompt(processor, case.backbone, QUESTION, recipe["model"].get("chat_template", "processor"))
    inputs = case.backbone.build_inputs(processor, [Image.open(image).convert("RGB")], [text], [QUESTION])
    tokens = greedy_without_cache(model.eval(), inputs, 4, processor.tokenizer.eos_token_id)
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()


@pytest.mark.parametrize("name", ["instructblip", "openclip_vicuna"])
def test_bench_runs_on_every_backbone(name, tiny_models, tmp_path):
    case = build_case(name, tmp_path, tiny_models)
    args = ("--methods", "m2pt,lora,limit", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "48")
    m2pt("bench", case.recipe, *args, "--no-memory", "--output", tmp_path / "bench.json")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {row["method"] for row in report["rows"]} == {"m2pt", "lora", "limit"}
    assert report["token_ratio"] > 1 and report["decode_tokens_per_second_with_prompts"] > 0


@pytest.mark.parametrize("name", ["instructblip", "instructblip_opt", "openclip_vicuna"])
def test_attention_shares_or_a_clear_refusal(name, tiny_models, tmp_path):
    from m2pt_cli.attention import shares
    from m2pt_cli.errors import UserError

    case = build_case(name, tmp_path, tiny_models)
    model, processor = m2pt_cli.load(case.recipe, overrides=("model.attn_implementation=eager",))
    image = Image.new("RGB", (32, 32), "white")
    if name == "openclip_vicuna":  # open_clip's blocks use nn.MultiheadAttention without weights
        with pytest.raises(UserError, match="does not expose attention weights"):
            shares(model, processor, case.backbone, case.template, image, QUESTION)
        return
    result = shares(model, processor, case.backbone, case.template, image, QUESTION)
    for head in range(len(result["text"]["prompt_share"])):
        total = sum(result["text"][k][head] for k in ("prompt_share", "image_share", "text_share"))
        assert total == pytest.approx(1, abs=1e-5)
        assert result["text"]["image_share"][head] > 0  # the query tokens before BOS count as image
    for head in range(len(result["vision"]["prompt_share"])):
        assert result["vision"]["prompt_share"][head] + result["vision"]["other_share"][head] == pytest.approx(1)
