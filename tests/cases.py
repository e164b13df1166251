"""One tiny model per backbone (and LLM family), with its recipe and an independent reference.

``Case.reference`` recomputes a model's logits for one unpadded sample from the base model's own
blocks (tests/reference.py): ``scheme="official"`` is the official code's scheme (all layers),
``scheme="per_layer"`` the layer-by-layer definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from m2pt_cli import config as recipe_config
from m2pt_cli.registry import BACKBONES
from tests import reference
from tests.helpers import chat_inputs

NAMES = ("llava", "instructblip", "instructblip_opt", "openclip_vicuna")
QUESTIONS = ["What colour is it?", "Is there a cat in this picture? Answer yes or no."]


def images(n: int = 2) -> list[Image.Image]:
    colours = [(200, 30, 30), (20, 90, 220), (10, 200, 40)]
    out = []
    for i in range(n):
        img = Image.new("RGB", (40, 36), colours[i % 3])
        img.paste((255, 255, 255), (5 * i, 4, 5 * i + 12, 20))
        out.append(img)
    return out


@dataclass
class Case:
    name: str
    backbone_name: str
    recipe: Path
    template: str
    trainable: list[str]
    tokens_per_image: int
    trained_prefixes: tuple[str, ...]  # named_parameters() of M2PTModel trained besides the prompts

    @property
    def backbone(self):
        return BACKBONES.get(self.backbone_name)

    def inputs(self, processor, n=2, side="right", answers=None) -> dict:
        processor.tokenizer.padding_side = side
        return chat_inputs(self.backbone, processor, images(n), QUESTIONS[:n], answers, self.template)

    def plain_base(self):
        """The base model loaded by the backbone, without M²PT."""
        model = recipe_config.load(self.recipe).model
        return self.backbone.load(model).model.eval()

    def image_token_id(self, processor) -> int:
        return self.backbone.image_token_id(processor)

    def reference(self, base, x: dict, vision: dict, text: dict, n_text: int, scheme: str, image_id: int):
        """Logits of one unpadded sample ``x`` with prompts {layer: (N, D)} by the chosen scheme."""
        encoder = reference.encoder_official if scheme == "official" else reference.encoder_per_layer
        features, stack, head = FEATURES[self.name](base, x, vision, encoder)
        embeds = reference.merge_image(stack.get_input_embeddings(), x["input_ids"], features, image_id)
        if self.name == "instructblip_opt":
            if scheme == "official":
                return reference.opt_official(stack, head, embeds, text)
            return reference.opt_per_layer(stack, head, embeds, text, n_text)
        if scheme == "official":
            return reference.llama_official(stack, head, embeds, text)
        return reference.llama_per_layer(stack, head, embeds, text, n_text)


def _llava(base, x, vision, encoder):
    tower = base.model.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(x["pixel_values"]))
    states = encoder(tower.encoder.layers, lambda block, h: block(h, None), hidden, vision)
    features = base.model.multi_modal_projector(states[base.config.vision_feature_layer][:, 1:])
    return features, base.model.language_model, base.lm_head


def _instructblip(base, x, vision, encoder):
    tower = base.vision_model
    states = encoder(tower.encoder.layers, lambda block, h: block(h), tower.embeddings(x["pixel_values"]), vision)
    image_embeds = tower.post_layernorm(states[-1])
    queries = base.query_tokens.expand(image_embeds.shape[0], -1, -1)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), x["qformer_attention_mask"]], dim=1)
    out = base.qformer(
        input_ids=x["qformer_input_ids"],
        attention_mask=mask,
        query_embeds=queries,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
    )
    features = base.language_projection(out.last_hidden_state[:, : queries.shape[1]])
    lm = base.language_model
    return features, lm.get_decoder(), lm.get_output_embeddings()


def _openclip(base, x, vision, encoder):
    visual = base.visual
    pixels = x["pixel_values"]
    patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, grid², width)
    cls = visual.class_embedding.expand(patches.shape[0], 1, -1)
    hidden = visual.ln_pre(torch.cat([cls, patches], dim=1) + visual.positional_embedding)
    states = encoder(visual.transformer.resblocks, lambda block, h: block(h), hidden, vision)
    features = base.projector(states[-2][:, 1:])  # second-to-last block, CLS dropped
    lm = base.language_model
    return features, lm.get_decoder(), lm.get_output_embeddings()


FEATURES = {
    "llava": _llava,
    "instructblip": _instructblip,
    "instructblip_opt": _instructblip,
    "openclip_vicuna": _openclip,
}


def build_case(name: str, folder: Path, tiny: dict[str, Any]) -> Case:
    """Write the case's recipe into ``folder``; ``tiny`` holds the tiny model paths."""
    model: dict[str, Any] = {"dtype": "float32"}
    trainable = ["projector"]
    template = "processor"
    if name == "llava":
        model.update(backbone="llava", name_or_path=str(tiny["llava"]))
    elif name.startswith("instructblip"):
        model.update(backbone="instructblip", name_or_path=str(tiny[name]), chat_template="plain")
        trainable = ["projector", "query_tokens"]
        template = "plain"
    else:
        model.update(
            backbone="openclip_vicuna",
            name_or_path=str(tiny[name] / "llm"),
            vision_tower=str(tiny[name] / "vit"),
            projector="mlp2x_gelu",
            projector_weights=str(tiny[name] / "mm_projector.bin"),
        )
    recipe = {
        "model": model,
        "prompts": {"vision": {"length": 3, "layers": "all"}, "text": {"length": 3, "layers": "all"}},
        "trainable": trainable,
        "seed": 3,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    tokens = 4 if name.startswith("instructblip") else 16  # query tokens, or (32 px / patch 8)² patches
    prefixes = {
        "llava": ("base.model.multi_modal_projector.",),
        "instructblip": ("base.language_projection.", "base.query_tokens"),
        "instructblip_opt": ("base.language_projection.", "base.query_tokens"),
        "openclip_vicuna": ("base.projector.",),
    }[name]
    return Case(name, model["backbone"], path, template, trainable, tokens, prefixes)
