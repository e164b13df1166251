"""LLaVA runs its vision encoder only up to the layer it reads (``vision_feature_layer = -2``).

The reference is the untouched Hugging Face model loaded from the same folder: the same logits,
while the last encoder layer never runs and the model keeps every layer, weight and key.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import m2pt_cli
from m2pt_cli import hf_conventions as hf
from tests.helpers import chat_inputs


def _inputs(model, processor):
    from PIL import Image

    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (20, 90, 220))]
    return chat_inputs(model.backbone, processor, images, ["What is it?", "And the colour?"])


def _calls(blocks) -> tuple[list[int], list]:
    counts = [0] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):

        def count(module, args, i=i):
            counts[i] += 1

        handles.append(block.register_forward_pre_hook(count))
    return counts, handles


@torch.no_grad()
def test_same_logits_as_the_untouched_model_without_the_last_encoder_layer(tiny_recipe, tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    model, processor = m2pt_cli.load(tiny_recipe, overrides=("prompts.vision.length=0", "prompts.text.length=0"))
    model.eval()
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    x = _inputs(model, processor)
    keys_before = list(model.base.state_dict())
    blocks = model.backbone.vision_tower(model.base).blocks
    counts, handles = _calls(blocks)
    try:
        ours = model(**x).logits
    finally:
        for handle in handles:
            handle.remove()
    assert model.base.config.vision_feature_layer == -2 and len(blocks) == 4
    assert counts == [1, 1, 1, 0]  # the last layer's output is never read, so it never runs
    assert list(model.base.state_dict()) == keys_before and len(model.backbone.vision_tower(model.base).blocks) == 4
    full = reference(**x).logits
    assert (ours - full).abs().max().item() <= 1e-5
    # the comparison sees a wrong layer: reading the last one, or the one before -2, moves the logits
    for wrong in (-1, -3):
        other = reference(**x, vision_feature_layer=wrong).logits
        assert (other - full).abs().max().item() > 1e-3, wrong


@torch.no_grad()
def test_prompts_reach_every_layer_that_runs(tiny_recipe):
    """Visual prompts on ``all`` layers means the layers that are read; each of them runs with its prompts."""
    model, processor = m2pt_cli.load(tiny_recipe)
    cfg = model.m2pt_config
    assert cfg.vision_layers == [0, 1, 2] and cfg.vision_unused_layers == [3]
    blocks = model.backbone.vision_tower(model.base).blocks
    lengths: dict[int, int] = {}

    def seen(i: int):
        def hook(module, args) -> None:
            lengths[i] = args[0].shape[1]

        return hook

    handles = [blocks[i].register_forward_pre_hook(seen(i)) for i in range(len(blocks))]
    try:
        model.eval()(**_inputs(model, processor))
    finally:
        for handle in handles:
            handle.remove()
    patches = lengths[0] - cfg.vision_length
    assert lengths == {i: patches + cfg.vision_length for i in cfg.vision_layers}


class _Tower(nn.Module):
    """A tower that runs ``encoder.layers`` and returns one hidden state per layer run (as CLIP does),
    or ``extra`` more."""

    def __init__(self, n: int, extra: int = 0):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))
        self.extra = extra

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput

        states = [x]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return BaseModelOutput(last_hidden_state=states[-1], hidden_states=tuple(states + states[: self.extra]))


def test_the_stop_is_for_the_call_only_and_fails_loudly():
    tower = _Tower(4)
    full = tower.encoder.layers
    assert hf.run_encoder_layers_up_to(tower, tower.encoder, 4) == []  # every layer read: nothing to stop
    handles = hf.run_encoder_layers_up_to(tower, tower.encoder, 3)
    out = tower(torch.ones(1, 2))
    assert tower.encoder.layers is full and len(out.hidden_states) == 5 and out.hidden_states[-1] is None
    assert torch.equal(out.hidden_states[-2], full[2](full[1](full[0](torch.ones(1, 2)))))
    with pytest.raises(TypeError):
        tower("not a tensor")
    assert tower.encoder.layers is full  # restored although the call raised
    for handle in handles:
        handle.remove()
    wrong = _Tower(4, extra=1)
    hf.run_encoder_layers_up_to(wrong, wrong.encoder, 3)
    with pytest.raises(hf.ConventionError, match="hidden states"):
        wrong(torch.ones(1, 2))
    odd = _Tower(2)
    odd.encoder = nn.Module()
    odd.encoder.layers = [nn.Linear(2, 2)]  # a plain list: not the structure m2pt knows
    with pytest.raises(hf.ConventionError, match="ModuleList"):
        hf.run_encoder_layers_up_to(odd, odd.encoder, 1)
