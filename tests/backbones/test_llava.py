"""The llava backbone: which encoder layers are unused, chat-template inputs, the demo base."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import m2pt_cli
from m2pt_cli.backbones.llava import LlavaBackbone, unused_after
from tests.conftest import REPO
from tests.helpers import chat_inputs


@pytest.mark.parametrize(
    "feature_layer, n_layers, expected",
    [(-2, 24, (23,)), (-1, 24, ()), (-2, 4, (3,)), (12, 24, tuple(range(12, 24))), ([-2, -5], 24, (23,))],
)
def test_unused_encoder_layers(feature_layer, n_layers, expected):
    assert unused_after(feature_layer, n_layers) == expected


def test_build_inputs_uses_the_chat_template(tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    image = Image.new("RGB", (20, 20), "red")
    prompt = chat_inputs(LlavaBackbone(), processor, [image], ["What is it?"])
    text = processor.tokenizer.decode(prompt["input_ids"][0])
    assert text == "<s>USER: " + "<image>" * 16 + "\nWhat is it? ASSISTANT:"
    full = chat_inputs(LlavaBackbone(), processor, [image], ["What is it?"], ["A red square."])
    text = processor.tokenizer.decode(full["input_ids"][0])
    assert text.endswith("\nWhat is it? ASSISTANT: A red square.</s>")
    assert prompt["pixel_values"].shape == (1, 3, 32, 32)


def test_demo_base_loads_offline_and_is_the_same_every_time():
    model_a, processor = m2pt_cli.load(REPO / "recipes" / "demo.yaml")
    model_b, _ = m2pt_cli.load(REPO / "recipes" / "demo.yaml")
    for (name, a), (_, b) in zip(model_a.base.state_dict().items(), model_b.base.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(model_a.text_prompts, model_b.text_prompts)  # seeded initialisation
    image = Image.new("RGB", (8, 8), "white")
    inputs = chat_inputs(LlavaBackbone(), processor, [image], ["What digit is this?"])
    out = model_a.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
