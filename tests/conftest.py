"""Shared fixtures: tiny models saved to temporary folders (one per backbone case) and recipes for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # optimizer steps of the shared tiny training run


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


@pytest.fixture(scope="session")
def train_recipe(tiny_llava_dir, tmp_path_factory) -> Path:
    """Tiny LLaVA on 96 digits: 8 steps of 8 samples, checkpoints every 2 steps."""
    recipe = {
        "name": "tiny-train",
        "description": "test",
        "seed": 5,
        "model": {"backbone": "llava", "name_or_path": str(tiny_llava_dir), "dtype": "float32"},
        "prompts": {"vision": {"length": 2}, "text": {"length": 2}},
        "data": {"sources": [{"format": "digits", "limit": 96}], "eval_size": 16, "max_length": 96},
        "train": {
            "max_steps": STEPS,
            "learning_rate": 5e-3,
            "global_batch_size": 8,
            "per_device_batch_size": 8,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": 10,
            "eval_samples": 8,
            "eval_max_new_tokens": 3,
            "warmup_ratio": 0.1,
        },
    }
    path = tmp_path_factory.mktemp("train") / "tiny-train.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def finished_run(train_recipe, tmp_path_factory) -> Path:
    """The tiny recipe trained to the end through the CLI."""
    run = tmp_path_factory.mktemp("runs") / "full"
    from tests.helpers import m2pt

    m2pt("train", train_recipe, "--output-dir", run)
    return run


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many bad-input cases ran (the error-handling suite's size)."""
    passed = terminalreporter.stats.get("passed", [])
    count = sum(1 for report in passed if "bad_input" in report.keywords)
    if count:
        terminalreporter.write_line(f"bad-input cases run through the CLI: {count} passed")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_llava_dir) -> dict[str, Path]:
    """One tiny base per backbone case, built lazily on first use."""
    from backbones import _tiny

    class Lazy(dict):
        def __missing__(self, name):
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            if name.startswith("instructblip"):
                llm = "opt" if name.endswith("opt") else "llama"
                path = _tiny.save_tiny_instructblip(folder, _tiny.tiny_instructblip_config(llm), seed=1)
            else:
                from backbones.openclip_vicuna import build_projector

                _tiny.save_tiny_open_clip(folder / "vit", seed=1)
                _tiny.save_tiny_vicuna(folder / "llm", seed=1)
                torch.manual_seed(2)
                _tiny.save_llava_projector(folder / "mm_projector.bin", build_projector("mlp2x_gelu", 32, 64))
                path = folder
            self[name] = path
            return path

    return Lazy(llava=tiny_llava_dir)


@pytest.fixture(scope="session", params=["llava", "instructblip", "instructblip_opt", "openclip_vicuna"])
def case(request, tiny_models, tmp_path_factory):
    """Each backbone (and InstructBLIP's two LLM families) on a tiny model, with its recipe."""
    from tests.cases import build_case

    return build_case(request.param, tmp_path_factory.mktemp("case"), tiny_models)
