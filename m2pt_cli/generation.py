"""Greedy answers from an adapter folder: the core of ``m2pt generate``."""

from __future__ import annotations

from pathlib import Path

from m2pt_cli.data.collate import open_image
from m2pt_cli.model_source import resolve_model_source


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
    loaded = resolve_model_source(source, base=base_model, base_only=use_base).load(device=device)
    picture = open_image({"path": str(image)}, str(image), loaded.recipe.data.max_image_pixels)  # the image policy
    return loaded.answer([picture], [prompt], max_new_tokens=max_new_tokens)[0].strip()
