"""Shared fixtures: a tiny LLaVA saved to a temporary folder and a recipe that points at it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA (CLIP 4 x 32, Llama 4 x 64 with grouped-query attention) saved with save_pretrained."""
    from backbones._tiny import save_tiny_llava, tiny_llava_config

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), tiny_llava_config(), seed=1)


@pytest.fixture(scope="session")
def tiny_recipe(tiny_llava_dir, tmp_path_factory) -> Path:
    """A recipe for the tiny LLaVA: 3 visual and 3 textual prompts in all layers, fp32."""
    recipe = {
        "model": {"backbone": "llava", "name_or_path": str(tiny_llava_dir), "dtype": "float32"},
        "prompts": {"vision": {"length": 3, "layers": "all"}, "text": {"length": 3, "layers": "all"}},
        "trainable": ["projector"],
        "seed": 3,
    }
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
