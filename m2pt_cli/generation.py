"""Greedy answers from an adapter folder: the core of ``m2pt generate``."""

from __future__ import annotations

from pathlib import Path

from m2pt_cli import adapter as adapter_files
from m2pt_cli.data.collate import open_image
from m2pt_cli.loading import load


def answer(
    source: Path,
    image: Path,
    prompt: str,
    max_new_tokens: int = 64,
    use_base: bool = False,
    base_model: str | None = None,
    device: str = "cpu",
) -> str:
    """The model's greedy answer to ``prompt`` about ``image`` (``LoadedModel.answer``).

    Args:
        use_base: answer with the base model (same recipe, no prompts, no trained tensors).
    """
    folder = adapter_files.find_adapter(source)
    if use_base:
        overrides = ("method=m2pt", "prompts.vision.length=0", "prompts.text.length=0")
        loaded = load(adapter_files.recipe_of(folder), overrides=overrides, base=base_model, device=device)
    else:
        loaded = load(folder, base=base_model, device=device)
    picture = open_image({"path": str(image)}, str(image), loaded.recipe.data.max_image_pixels)  # the image policy
    return loaded.answer([picture], [prompt], max_new_tokens=max_new_tokens)[0].strip()
