"""LLaVA through transformers' ``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-7b-hf and kin)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from backbones.base import Backbone, DecoderTower, Loaded, ModelSource, Tower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a recipe dtype name to a torch dtype."""
    return DTYPES[name]


def unused_after(feature_layer: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Encoder blocks whose output a ``vision_feature_layer`` selection never reads.

    ``hidden_states[k]`` is the output of block ``k - 1`` (index 0 is the embeddings).
    """
    picks = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    last = max(k if k >= 0 else n_layers + 1 + k for k in picks)  # hidden_states index
    return tuple(range(last, n_layers))


class LlavaBackbone(Backbone):
    """LLaVA: CLIP ViT -> ``multi_modal_projector`` -> Llama-family LLM.

    Trainable module names: ``projector``, ``lm_head``, ``language_model``, ``vision_tower``.
    """

    trainable_modules = ("projector", "lm_head", "language_model", "vision_tower")

    def load(self, source: ModelSource, device: str = "cpu") -> Loaded:
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        if source.weights == "random":  # seeded weights from config.json alone (benchmarks)
            config = AutoConfig.from_pretrained(source.name_or_path, revision=source.revision)
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration._from_config(
                config, dtype=torch_dtype(source.dtype), attn_implementation=source.attn_implementation
            ).to(device)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(
                source.name_or_path,
                revision=source.revision,
                dtype=torch_dtype(source.dtype),
                attn_implementation=source.attn_implementation,
                trust_remote_code=source.trust_remote_code,
            ).to(device)
        processor = AutoProcessor.from_pretrained(
            source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
        return Loaded(model=model, processor=processor)

    def build_empty(self, source: ModelSource) -> nn.Module:
        from transformers import AutoConfig, LlavaForConditionalGeneration

        config = AutoConfig.from_pretrained(
            source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
        with torch.device("meta"):
            return LlavaForConditionalGeneration._from_config(config, dtype=torch_dtype(source.dtype))

    def vision_tower(self, model: nn.Module) -> Tower:
        config = model.config
        blocks = model.model.vision_tower.encoder.layers
        return Tower(
            blocks=blocks,
            width=config.vision_config.hidden_size,
            unused_layers=unused_after(config.vision_feature_layer, len(blocks)),
        )

    def language_tower(self, model: nn.Module) -> DecoderTower:
        stack = model.model.language_model
        return DecoderTower(
            blocks=stack.layers,
            width=model.config.text_config.hidden_size,
            stack=stack,
            embed=stack.get_input_embeddings(),
            attn_implementation=stack.config._attn_implementation,
        )

    def module(self, model: nn.Module, name: str) -> nn.Module:
        parts = {
            "projector": model.model.multi_modal_projector,
            "lm_head": model.lm_head,
            "language_model": model.model.language_model,
            "vision_tower": model.model.vision_tower,
        }
        return parts[name]

    def build_inputs(self, processor: Any, images: Sequence[Any], texts: Sequence[str]) -> dict:
        return processor(images=list(images) or None, text=list(texts), return_tensors="pt", padding=True)

    def pixel_values(self, processor: Any, images: Sequence[Any]) -> Any:
        return processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
