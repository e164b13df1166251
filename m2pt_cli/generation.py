"""Greedy answers from an adapter folder: the core of ``m2pt generate``."""

from __future__ import annotations

from pathlib import Path

import torch

from m2pt_cli import adapter as adapter_files
from m2pt_cli.chat import question_prompt
from m2pt_cli.data.collate import open_image
from m2pt_cli.loading import load
from m2pt_cli.registry import BACKBONES


def answer(
    source: Path,
    image: Path,
    prompt: str,
    max_new_tokens: int = 64,
    use_base: bool = False,
    base_model: str | None = None,
    device: str = "cpu",
) -> str:
    """The model's greedy answer to ``prompt`` about ``image``.

    Args:
        use_base: answer with the base model (same recipe, no prompts, no trained tensors).
    """
    from m2pt_cli import config

    folder = adapter_files.find_adapter(source)
    recipe = config.load(adapter_files.recipe_of(folder))
    template = recipe.model.chat_template
    overrides = ("method=m2pt", "prompts.vision.length=0", "prompts.text.length=0") if use_base else ()
    if use_base:
        model, processor = load(adapter_files.recipe_of(folder), overrides=overrides, base=base_model, device=device)
    else:
        model, processor = load(folder, base=base_model, device=device)
    backbone = BACKBONES.get(model.m2pt_config.backbone)
    text = question_prompt(processor, backbone, prompt, template)
    picture = open_image({"path": str(image)}, str(image), recipe.data.max_image_pixels)  # the image policy
    inputs = backbone.build_inputs(processor, [picture], [text], [prompt])
    inputs = {k: v.to(device) for k, v in inputs.items()}
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
