"""Training the LLM itself when its output layer is its input embedding (``tie_word_embeddings``, as in
SmolLM2): the shared tensor is trained, saved and restored as one tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import adapter, m2pt


def _tied_openclip_vicuna(folder: Path) -> dict:
    from m2pt_cli.backbones import _tiny
    from m2pt_cli.backbones.openclip_vicuna import build_projector

    _tiny.save_tiny_open_clip(folder / "vit", seed=1)
    _tiny.save_tiny_vicuna(folder / "llm", seed=1, tie_embeddings=True)
    torch.manual_seed(2)
    _tiny.save_llava_projector(folder / "mm_projector.bin", build_projector("mlp2x_gelu", 32, 64))
    return {
        "backbone": "openclip_vicuna",
        "name_or_path": str(folder / "llm"),
        "vision_tower": str(folder / "vit"),
        "projector": "mlp2x_gelu",
        "projector_weights": str(folder / "mm_projector.bin"),
    }


def _tied_llava(folder: Path) -> dict:
    from m2pt_cli.backbones import _tiny

    config = _tiny.tiny_llava_config()
    config.text_config.tie_word_embeddings = True
    config.tie_word_embeddings = True
    _tiny.save_tiny_llava(folder, config, seed=1)
    return {"backbone": "llava", "name_or_path": str(folder)}


# openclip_vicuna: the tie lies inside one trained module (language_model is the causal LM);
# llava: across two trained names (language_model holds the embedding, lm_head the output layer).
BASES = {"openclip_vicuna": (_tied_openclip_vicuna, []), "llava": (_tied_llava, ["lm_head"])}


@pytest.fixture(scope="module", params=sorted(BASES))
def tied_recipe(request, tmp_path_factory) -> Path:
    build, extra_trainable = BASES[request.param]
    folder = tmp_path_factory.mktemp(f"tied-{request.param}")
    recipe = {
        "name": f"tied-{request.param}",
        "seed": 4,
        "method": "full",
        "model": {**build(folder / "base"), "dtype": "float32"},
        "prompts": {"vision": {"length": 0}, "text": {"length": 0}},
        "trainable": ["projector", *extra_trainable],
        "data": {"sources": [{"format": "digits", "limit": 40}], "eval_size": 8, "max_length": 256},
        "train": {
            "max_steps": 2,
            "learning_rate": 1e-2,
            "global_batch_size": 4,
            "per_device_batch_size": 4,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "save_steps": 1,
            "eval_samples": 4,
            "eval_max_new_tokens": 2,
        },
    }
    path = folder / "tied.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tied_pair(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM's input embedding and output layer weights of an m2pt model."""
    llm = model.backbone.language_tower(model.base)
    return llm.embed.weight, model.backbone.module(model.base, "lm_head").weight


def test_adapter_holds_each_trained_tensor_once(tied_recipe):
    import m2pt_cli

    model, _ = m2pt_cli.load(tied_recipe)
    embed, head = _tied_pair(model)
    assert head is embed  # the base really ties them (else this test proves nothing)

    # reference: the distinct parameters that require grad, plus the two prompt tensors
    trained = {id(p): p for p in model.parameters() if p.requires_grad}
    state = model.adapter_state_dict()
    pointers = [t.data_ptr() for t in state.values() if t.numel()]
    assert len(pointers) == len(set(pointers))  # no tensor twice
    assert set(pointers) == {p.data_ptr() for p in trained.values() if p.numel()}
    assert sum(model.parameter_groups().values()) == sum(p.numel() for p in trained.values())


def test_full_finetuning_saves_checkpoints_and_reloads_the_tied_tensor(tied_recipe, tmp_path):
    import m2pt_cli

    run = tmp_path / "run"
    m2pt("train", tied_recipe, "--output-dir", run)
    assert {p.name for p in run.glob("checkpoint-*")} >= {"checkpoint-1", "checkpoint-2"}
    state = adapter(run)
    meta = json.loads((run / "adapter" / "m2pt_adapter.json").read_text())
    assert set(meta["tensors"]) == set(state)

    base, _ = m2pt_cli.load(tied_recipe)
    loaded, _ = m2pt_cli.load(run)
    base_embed, _ = _tied_pair(base)
    embed, head = _tied_pair(loaded)
    assert head is embed  # still one tensor after loading the adapter
    stored = [t for t in state.values() if t.shape == embed.shape]
    assert len(stored) == 1 and torch.equal(stored[0], embed.detach())
    assert not torch.equal(embed, base_embed)  # training moved it
