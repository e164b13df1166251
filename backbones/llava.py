"""LLaVA through transformers' ``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-7b-hf and kin)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from m2pt_cli.backbones.base import (
    Backbone,
    DecoderTower,
    Loaded,
    ModelSource,
    Tower,
    decoder_tower,
    hf_config,
    load_hf_model,
    repeat_image_tokens,
    torch_dtype,
)


def unused_after(feature_layer: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Encoder blocks whose output a ``vision_feature_layer`` selection never reads.

    ``hidden_states[k]`` is the output of block ``k - 1`` (index 0 is the embeddings).
    """
    picks = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    last = max(k if k >= 0 else n_layers + 1 + k for k in picks)  # hidden_states index
    return tuple(range(last, n_layers))


def stop_at_read_layer(model: nn.Module, tower: Tower) -> list:
    """Run the vision encoder only up to the last layer ``vision_feature_layer`` reads (LLaVA-1.5
    reads -2, so its last layer's output was computed and dropped); outputs are unchanged, the
    model's modules and weights untouched (``hf_conventions.run_encoder_layers_up_to``)."""
    from m2pt_cli import hf_conventions

    vision = model.model.vision_tower
    return hf_conventions.run_encoder_layers_up_to(vision, vision.encoder, len(tower.blocks) - len(tower.unused_layers))


class LlavaBackbone(Backbone):
    """LLaVA: CLIP ViT -> ``multi_modal_projector`` -> Llama-family LLM.

    Trainable module names: ``projector``, ``lm_head``, ``language_model``, ``vision_tower``.
    """

    trainable_modules = ("projector", "lm_head", "language_model", "vision_tower")

    def load(self, source: ModelSource, device: str = "cpu") -> Loaded:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        config = hf_config(source, "llava", ("llava",))
        model = load_hf_model(LlavaForConditionalGeneration, source, config, device).to(device)
        stop_at_read_layer(model, self.vision_tower(model))
        processor = AutoProcessor.from_pretrained(
            source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
        return Loaded(model=model, processor=processor)

    def load_processor(self, source: ModelSource) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(
            source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )

    def build_empty(self, source: ModelSource) -> nn.Module:
        from transformers import AutoModelForImageTextToText

        config = hf_config(source, "llava", ("llava",))
        with torch.device("meta"):  # LlavaForConditionalGeneration (a llava config); never repository code
            dtype = torch_dtype(source.dtype)
            return AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=False)

    def vision_tower(self, model: nn.Module) -> Tower:
        config = model.config
        blocks = model.model.vision_tower.encoder.layers
        return Tower(
            blocks=blocks,
            width=config.vision_config.hidden_size,
            unused_layers=unused_after(config.vision_feature_layer, len(blocks)),
        )

    def language_tower(self, model: nn.Module) -> DecoderTower:
        return decoder_tower(model.model.language_model, model.config.text_config.hidden_size)

    def module(self, model: nn.Module, name: str) -> nn.Module:
        parts = {
            "projector": model.model.multi_modal_projector,
            "lm_head": model.lm_head,
            "language_model": model.model.language_model,
            "vision_tower": model.model.vision_tower,
        }
        return parts[name]

    def image_token_id(self, processor: Any) -> int:
        return processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def place_image_tokens(self, processor: Any, ids: list[int], has_image: bool = True) -> list[int]:
        return repeat_image_tokens(ids, self.image_token_id(processor), tokens_per_image(self, processor))

    def image_inputs(self, processor: Any, images: Sequence[Any], instructions: Sequence[str]) -> dict:
        return {"pixel_values": processor.image_processor(list(images), return_tensors="pt")["pixel_values"]}

    def build_inputs(
        self, processor: Any, images: Sequence[Any], texts: Sequence[str], instructions: Sequence[str] | None = None
    ) -> dict:
        return processor(images=list(images) or None, text=list(texts), return_tensors="pt", padding=True)


_TOKENS_PER_IMAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokens_per_image(backbone: Backbone, processor: Any) -> int:
    """How many image tokens ``backbone.build_inputs`` puts in for one image (probed once per processor)."""
    if processor not in _TOKENS_PER_IMAGE:
        from PIL import Image

        image_id = backbone.image_token_id(processor)
        token = processor.tokenizer.convert_ids_to_tokens(image_id)
        probe = backbone.build_inputs(processor, [Image.new("RGB", (32, 32))], [token])
        _TOKENS_PER_IMAGE[processor] = int((probe["input_ids"][0] == image_id).sum())
    return _TOKENS_PER_IMAGE[processor]
