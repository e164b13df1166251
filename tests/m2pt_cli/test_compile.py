"""torch.compile through M²PT's hooks: same losses as eager, no graph break inside a layer."""

from __future__ import annotations

import json

import pytest
import torch

from m2pt_cli.benchmark.methods import noise_images
from tests.conftest import REPO
from tests.helpers import m2pt

DEMO = REPO / "recipes" / "demo.yaml"
# 20 optimizer steps of 2 samples, the held-out answers (generated, uncompiled) on 4 samples
SHORT = (
    "train.max_steps=20",
    "train.per_device_batch_size=2",
    "train.global_batch_size=2",
    "train.logging_steps=1",
    "train.save_steps=1000",
    "train.eval_samples=4",
    "data.eval_size=4",
)


def _losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_adapter_generates(tmp_path):
    """``train.torch_compile: true`` (inductor, compiled with the system's C++ compiler on CPU) gives the
    losses of the eager run step by step; the held-out answers and ``m2pt generate`` work with its adapter."""
    m2pt("train", DEMO, *SHORT, "--output-dir", tmp_path / "eager")
    # a process of its own, as a user runs it: dynamo's state from the tests before never reaches it
    m2pt("train", DEMO, *SHORT, "train.torch_compile=true", "--output-dir", tmp_path / "compiled", process=True)
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 20
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=1e-4)
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["held_out_accuracy_after"] is not None  # the held-out answers were generated
    image = tmp_path / "noise.png"
    noise_images(1)[0].save(image)
    adapter = tmp_path / "compiled" / "adapter"
    question = ("--prompt", "Which digit?", "--max-new-tokens", "4")
    result = m2pt("generate", "--adapter", adapter, "--image", image, *question)
    assert result.stdout.strip()


@pytest.mark.parametrize(("text_layers", "checkpointing"), [("all", False), ("[0,2]", False), ("[0,2]", True)])
def test_no_graph_break_inside_a_layer(tiny_recipe, text_layers, checkpointing):
    """The prompt hooks trace into their layer's graph, with prompts in every decoder layer or in some
    (the others get the prompt columns masked out by a hook of their own), also with activation
    checkpointing (the recipes' default), which runs each layer and its hooks inside a checkpoint."""
    from m2pt_cli.benchmark import Shapes, build_method, graph_breaks, synthetic_batch

    model, processor, _ = build_method(tiny_recipe, "m2pt", (f"prompts.text.layers={text_layers}",), "cpu")
    if checkpointing:
        model.activation_checkpointing_enable()
    found = graph_breaks(model, synthetic_batch(model, processor, Shapes(2, 40), "cpu"))
    assert found["graphs"] >= found["graph_breaks"] + 1
    assert found["graph_breaks_in_layers"] == 0, found["graph_break_reasons"]
    assert all(not r["in_layer"] for r in found["graph_break_reasons"])


def test_a_graph_break_inside_a_layer_is_counted(tiny_recipe):
    """The count can fail: a hook on one decoder layer that breaks the graph is found inside the layers."""
    from m2pt_cli.benchmark import Shapes, build_method, graph_breaks, synthetic_batch

    model, processor, _ = build_method(tiny_recipe, "m2pt", (), "cpu")
    batch = synthetic_batch(model, processor, Shapes(2, 40), "cpu")
    before = graph_breaks(model, batch)
    block = model.backbone.language_tower(model.base).blocks[1]
    block.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    after = graph_breaks(model, batch)
    assert before["graph_breaks_in_layers"] == 0 and after["graph_breaks_in_layers"] == 1
    assert [r["where"] for r in after["graph_break_reasons"] if r["in_layer"]] == [
        next(r["where"] for r in after["graph_break_reasons"] if "test_compile.py" in r["where"])
    ]  # the one inside is the test's hook
