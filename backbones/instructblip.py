"""InstructBLIP through transformers' ``InstructBlipForConditionalGeneration`` (Salesforce/instructblip-vicuna-7b
and kin, with a Llama/Vicuna or OPT language model; Flan-T5 checkpoints are refused)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from m2pt_cli.backbones.base import (
    Backbone,
    BackboneError,
    DecoderTower,
    Loaded,
    ModelSource,
    Tower,
    decoder_tower,
    hf_config,
    load_hf_model,
    torch_dtype,
)

# The Q-Former reads at most this many instruction tokens (LAVIS' max_txt_len for InstructBLIP).
QFORMER_MAX_TOKENS = 128


def _check_decoder_only(config, name: str) -> None:
    if not getattr(config, "use_decoder_only_language_model", True):
        raise BackboneError(
            f"model.name_or_path: {name} has an encoder-decoder language model "
            f"({config.text_config.model_type}); M²PT's textual prompts need a decoder-only LLM: "
            "use a Vicuna or OPT InstructBLIP checkpoint (e.g. Salesforce/instructblip-vicuna-7b)"
        )


class InstructBlipBackbone(Backbone):
    """InstructBLIP: EVA ViT -> Q-Former (query tokens + instruction) -> ``language_projection`` -> LLM.

    The processor puts the query-token placeholders in front of the text (before BOS), so prompts
    and chat templates never mention the image. Trainable module names: ``projector``
    (``language_projection``), ``qformer``, ``query_tokens``, ``lm_head``, ``language_model``,
    ``vision_tower``.
    """

    trainable_modules = ("projector", "qformer", "query_tokens", "lm_head", "language_model", "vision_tower")
    image_in_text = False

    def load(self, source: ModelSource, device: str = "cpu") -> Loaded:
        from transformers import AutoProcessor, InstructBlipForConditionalGeneration

        config = hf_config(source, "instructblip", ("instructblip",))
        _check_decoder_only(config, source.name_or_path)
        model = load_hf_model(InstructBlipForConditionalGeneration, source, config, device)
        processor = AutoProcessor.from_pretrained(
            source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
        return Loaded(model=model.to(device), processor=processor)

    def load_processor(self, source: ModelSource) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(
            source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )

    def build_empty(self, source: ModelSource) -> nn.Module:
        from transformers import AutoModelForImageTextToText

        config = hf_config(source, "instructblip", ("instructblip",))
        _check_decoder_only(config, source.name_or_path)
        with torch.device("meta"):  # InstructBlipForConditionalGeneration; never repository code
            dtype = torch_dtype(source.dtype)
            return AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=False)

    def vision_tower(self, model: nn.Module) -> Tower:
        return Tower(blocks=model.vision_model.encoder.layers, width=model.config.vision_config.hidden_size)

    def language_tower(self, model: nn.Module) -> DecoderTower:
        stack = model.language_model.get_decoder()  # LlamaModel, or OPTDecoder
        return decoder_tower(stack, model.config.text_config.hidden_size)

    def module(self, model: nn.Module, name: str) -> nn.Module | nn.Parameter:
        parts = {
            "projector": model.language_projection,
            "qformer": model.qformer,
            "query_tokens": model.query_tokens,
            "lm_head": model.language_model.get_output_embeddings(),
            "language_model": model.language_model,
            "vision_tower": model.vision_model,
        }
        return parts[name]

    def image_token_id(self, processor: Any) -> int:
        return processor.tokenizer.convert_tokens_to_ids(str(getattr(processor.image_token, "content", "<image>")))

    def place_image_tokens(self, processor: Any, ids: list[int], has_image: bool = True) -> list[int]:
        if not has_image:
            raise BackboneError("backbone instructblip needs an image in every record")
        return [self.image_token_id(processor)] * processor.num_query_tokens + list(ids)

    def image_inputs(self, processor: Any, images: Sequence[Any], instructions: Sequence[str]) -> dict:
        pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, **self._qformer_inputs(processor, instructions)}

    def build_inputs(
        self, processor: Any, images: Sequence[Any], texts: Sequence[str], instructions: Sequence[str] | None = None
    ) -> dict:
        inputs = processor(images=list(images) or None, text=list(texts), return_tensors="pt", padding=True)
        inputs.update(self._qformer_inputs(processor, instructions if instructions is not None else texts))
        return dict(inputs)

    @staticmethod
    def _qformer_inputs(processor: Any, instructions: Sequence[str]) -> dict:
        """The instruction as the Q-Former reads it (its own tokenizer, right-padded)."""
        tokenizer = processor.qformer_tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            enc = tokenizer(
                list(instructions), padding=True, truncation=True, max_length=QFORMER_MAX_TOKENS, return_tensors="pt"
            )
        finally:
            tokenizer.padding_side = side
        return {"qformer_input_ids": enc["input_ids"], "qformer_attention_mask": enc["attention_mask"]}
