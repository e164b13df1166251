"""The openclip_vicuna backbone: LLaVA projector files, open_clip towers, the paper's feature layer."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import yaml

import m2pt_cli
from m2pt_cli.backbones._tiny import TINY_OPEN_CLIP, save_llava_projector
from m2pt_cli.backbones.openclip_vicuna import build_projector
from m2pt_cli.errors import UserError
from tests.cases import images


def recipe(tmp_path, tiny, **model) -> str:
    spec = {
        "backbone": "openclip_vicuna",
        "name_or_path": str(tiny / "llm"),
        "vision_tower": str(tiny / "vit"),
        "dtype": "float32",
        **model,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": spec, "prompts": {"vision": {"length": 2}, "text": {"length": 2}}}))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["openclip_vicuna"]


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_loads_from_a_llava_mm_projector_bin(tmp_path, tiny, kind):
    torch.manual_seed(7)
    written = build_projector(kind, 32, 64)
    save_llava_projector(tmp_path / "mm_projector.bin", written)
    raw = torch.load(tmp_path / "mm_projector.bin", weights_only=True)
    assert all(key.startswith("model.mm_projector.") for key in raw)
    model, _ = m2pt_cli.load(
        recipe(tmp_path, tiny, projector=kind, projector_weights=str(tmp_path / "mm_projector.bin"))
    )
    loaded = model.base.projector.state_dict()
    assert loaded.keys() == written.state_dict().keys()
    for key, value in written.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert model.adapter_state_dict().keys() >= {f"projector.{k}" for k in loaded}


def test_projector_of_the_wrong_type_is_named(tmp_path, tiny):
    save_llava_projector(tmp_path / "mm_projector.bin", build_projector("mlp2x_gelu", 32, 64))
    with pytest.raises(UserError, match=r"holds tensors \['0.bias'.*a linear projector needs \['bias', 'weight'\]"):
        m2pt_cli.load(recipe(tmp_path, tiny, projector="linear", projector_weights=str(tmp_path / "mm_projector.bin")))


class NotATensor:
    """Pickled by the test; ``torch.load(weights_only=True)`` must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_projector_files_are_never_unpickled(tmp_path, tiny, capsys):
    torch.save({"model.mm_projector.weight": NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(UserError, match="evil.bin is not a tensor file"):
        m2pt_cli.load(recipe(tmp_path, tiny, projector_weights=str(tmp_path / "evil.bin")))
    assert "this must never run" not in capsys.readouterr().out


def test_tower_from_a_model_config_registered_at_run_time(tmp_path, tiny):
    (tmp_path / "m2pt-tiny-vit.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "m2pt-tiny-vit.json")
    model, processor = m2pt_cli.load(recipe(tmp_path, tiny, vision_tower="m2pt-tiny-vit"))  # pretrained=None
    assert len(model.base.visual.transformer.resblocks) == 3
    assert model.m2pt_config.vision_layers == [0, 1]  # block 2's output is never read
    x = dict(processor(images=images(1), text=["USER: <image>\nHi ASSISTANT:"]))
    assert model(**x).logits.shape[1] == x["input_ids"].shape[1]


def test_unknown_tower_suggests_the_nearest_open_clip_model(tmp_path, tiny):
    with pytest.raises(UserError, match=r"'ViT-L14' is not an open_clip model nor a folder; did you mean 'ViT-L-14'"):
        m2pt_cli.load(recipe(tmp_path, tiny, vision_tower="ViT-L14"))


def test_keys_of_another_backbone_are_refused(tmp_path, tiny_recipe):
    with pytest.raises(UserError, match="model.projector_weights: backbone 'llava' does not read it"):
        m2pt_cli.load(tiny_recipe, overrides=("model.projector_weights=x.bin",))


@torch.no_grad()
def test_features_are_the_second_to_last_block_without_cls(tmp_path, tiny):
    model, processor = m2pt_cli.load(
        recipe(tmp_path, tiny, projector="mlp2x_gelu"), overrides=("prompts.vision.length=0",)
    )
    visual = model.base.visual
    last_block_calls = []
    visual.transformer.resblocks[-1].register_forward_hook(lambda *args: last_block_calls.append(1))
    pixels = processor.pixel_values(images(2))
    tokens = visual(pixels)  # open_clip's own forward runs every block: drop its call
    last_block_calls.clear()
    with torch.no_grad():
        x = visual.ln_pre(
            torch.cat([visual.class_embedding.expand(2, 1, -1), visual.conv1(pixels).flatten(2).transpose(1, 2)], 1)
            + visual.positional_embedding
        )
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    assert tokens.shape[0] == 2
    features = model.base.image_features(pixels)
    assert torch.allclose(features, model.base.projector(x[:, 1:]), atol=1e-6)
    assert last_block_calls == []  # the unused block is never computed
    _, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tiny / 'vit'}")
    assert torch.equal(pixels[0], preprocess(images(1)[0]))  # open_clip's own preprocessing


def test_a_tower_folder_without_open_clip_config_is_named(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"model.vision_tower: cannot load '.*empty' \(.*open_clip_config.json"):
        m2pt_cli.load(recipe(tmp_path, tiny, vision_tower=str(tmp_path / "empty")))


def test_projector_download_failure_is_named(tmp_path, tiny, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested file in the local cache (offline).")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match=r"model.projector_weights: cannot fetch 'nobody/none/mm_projector.bin' \("):
        m2pt_cli.load(recipe(tmp_path, tiny, projector_weights="nobody/none/mm_projector.bin"))
