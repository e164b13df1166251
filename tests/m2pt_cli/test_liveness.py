"""Liveness of every tiny model, before any comparison with a reference is trusted.

A comparison proves nothing about a site that does not move the output: on a dead vision tower the
visual prompts change nothing, so any visual-prompt code matches the reference. These tests assert,
per backbone case, that each tower's output responds to its input and that each prompt site
(every chosen layer's visual and textual prompts, the projector) moves the logits by more than
``LIVE``, a hundred times the reference tests' tolerance (1e-5).
"""

from __future__ import annotations

import torch

import m2pt_cli
from m2pt_cli.prompts import init_prompts

LIVE = 1e-3


def load(recipe, *overrides):
    model, processor = m2pt_cli.load(recipe, overrides=overrides)
    return model.eval(), processor


def change(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def noise_like(pixels: torch.Tensor) -> torch.Tensor:
    """Another image: normalised pixels are about N(0, 1)."""
    return torch.randn(pixels.shape, generator=torch.Generator().manual_seed(11)).to(pixels.dtype)


def redrawn(param: torch.Tensor, seed: int) -> torch.Tensor:
    """Prompts from the library's default initialisation with another seed (same scale, other directions)."""
    layers, length, width = param.shape
    return init_prompts(layers, length, width, "xavier", torch.Generator().manual_seed(seed)).to(param)


class Capture:
    """Records the first output of a module on every call."""

    def __init__(self, module: torch.nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self.record)

    def record(self, module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        value = getattr(value, "last_hidden_state", value)
        self.outputs.append(value.detach().clone())


@torch.no_grad()
def test_towers_respond_to_their_inputs(case):
    model, processor = load(case.recipe, "prompts.vision.length=0", "prompts.text.length=0")
    base = model.remove_prompts()
    vision = case.backbone.vision_tower(base)
    read = max(i for i in range(len(vision.blocks)) if i not in vision.unused_layers)  # the last block read
    seen = Capture(vision.blocks[read])
    text = Capture(case.backbone.language_tower(base).stack)
    x = case.inputs(processor, 1)
    other_text = x["input_ids"].clone()
    last = int(other_text[0, -1])
    other_text[0, -1] = last + 1 if last + 1 < processor.tokenizer.vocab_size else last - 1
    logits = base(**x).logits
    noisy = base(**{**x, "pixel_values": noise_like(x["pixel_values"])}).logits
    reworded = base(**{**x, "input_ids": other_text}).logits
    (image_out, noise_out), (text_out, noise_text_out, reworded_out) = seen.outputs[:2], text.outputs[:3]
    effects = {
        "vision tower output, noise pixels": change(image_out, noise_out),
        "language tower output, noise pixels": change(text_out, noise_text_out),
        "language tower output, last token changed": change(text_out[:, -1], reworded_out[:, -1]),
        "logits, noise pixels": change(logits, noisy),
        "logits, last token changed": change(logits[:, -1], reworded[:, -1]),
    }
    print(case.name, {k: f"{v:.3g}" for k, v in effects.items()})
    assert all(v > LIVE for v in effects.values()), effects


@torch.no_grad()
def test_every_prompt_site_moves_the_logits(case):
    """Each chosen layer's prompts, redrawn at the same scale, and the projector, perturbed, move the logits."""
    model, processor = load(case.recipe)
    cfg = model.m2pt_config
    x = case.inputs(processor, 1)
    logits = model(**x).logits
    effects = {}
    for name, layers in (("vision_prompts", cfg.vision_layers), ("text_prompts", cfg.text_layers)):
        param = getattr(model, name)
        saved, other = param.detach().clone(), redrawn(param, seed=99)
        for slot, layer in enumerate(layers):
            param[slot] = other[slot]
            effects[f"{name}[layer {layer}]"] = change(model(**x).logits, logits)
            param.copy_(saved)
    projector = case.backbone.module(model.base, "projector")
    saved = {k: v.clone() for k, v in projector.state_dict().items()}
    for value in projector.parameters():
        value.copy_(value.flip(0))  # the same weights, other units
    effects["projector"] = change(model(**x).logits, logits)
    projector.load_state_dict(saved)
    assert torch.equal(model(**x).logits, logits)  # everything restored
    print(case.name, {k: f"{v:.3g}" for k, v in effects.items()})
    assert len(effects) == len(cfg.vision_layers) + len(cfg.text_layers) + 1
    assert all(v > LIVE for v in effects.values()), effects


@torch.no_grad()
def test_prompt_scale_reaches_the_blocks(case):
    """Prompts enter a block only through its input norm, which is blind to their scale except through its
    epsilon: at the default init (|P| about 0.3) doubling every prompt moves the logits by about 1e-7, so
    a hook that rescaled them would pass every comparison. Small prompts (std 1e-3, near the norms'
    sqrt(eps)) make the scale visible; with them the mechanism must still match the official scheme."""
    model, processor = load(case.recipe)
    cfg = model.m2pt_config
    generator = torch.Generator().manual_seed(5)
    for param in (model.vision_prompts, model.text_prompts):
        param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    one = case.inputs(processor, 1)
    expected = case.reference(
        case.plain_base(),
        one,
        {layer: model.vision_prompts[k] for k, layer in enumerate(cfg.vision_layers)},
        {layer: model.text_prompts[k] for k, layer in enumerate(cfg.text_layers)},
        cfg.text_length,
        "official",
        case.image_token_id(processor),
    )
    logits = model(**one).logits
    assert change(logits, expected) <= 1e-5
    effects = {}
    for name in ("vision_prompts", "text_prompts"):
        param = getattr(model, name)
        param.mul_(2)
        effects[name] = change(model(**one).logits, logits)
        param.div_(2)
    print(case.name, {k: f"{v:.3g}" for k, v in effects.items()})
    assert all(v > LIVE for v in effects.values()), effects
