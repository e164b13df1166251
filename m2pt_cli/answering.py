"""The one way from a model to answers: batched, left-padded greedy decoding under the training
autocast. ``m2pt generate``, ``m2pt eval`` and the held-out accuracy during training all call
``generate_answers``; it holds the package's only ``model.generate`` call."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2pt_cli.chat import end_of_turn, question_prompt
from m2pt_cli.config import Recipe

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_of(recipe: Recipe) -> str:
    """The recipe's training precision (``fp32``, ``bf16`` or ``fp16``); ``auto`` follows ``model.dtype``."""
    if recipe.train.precision != "auto":
        return recipe.train.precision
    return {"bfloat16": "bf16", "float16": "fp16"}.get(recipe.model.dtype, "fp32")


def autocast_for(precision: str, device_type: str) -> Callable[[], AbstractContextManager]:
    """A factory of the autocast context training runs under (none for ``fp32``)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return (lambda: torch.autocast(device_type, dtype=dtype)) if dtype is not None else nullcontext


@dataclass(frozen=True)
class PreparedImage:
    """An image already through the processor's image preprocessing: its ``pixel_values`` row
    (shape ``(1, C, H, W)``), all that generation reads of it. A server queues this instead of the
    decoded bitmap (kilobytes where a large photo is hundreds of megabytes)."""

    pixel_values: torch.Tensor


def prepare_image(processor: Any, backbone: Any, image: Any) -> PreparedImage:
    """``image`` (RGB) as the model will see it, computed now (``generate_answers`` takes it in its place)."""
    return PreparedImage(backbone.image_inputs(processor, [image], [""])["pixel_values"])


def _inputs(backbone: Any, processor: Any, images: Sequence[Any], prompts: list[str], requests: list[str]) -> dict:
    """``backbone.build_inputs`` for a batch; ``PreparedImage`` rows keep the pixel values they hold
    (the text goes through the processor with blank stand-ins of the prepared size, so token ids,
    image tokens and padding are exactly what the processor gives)."""
    prepared = [image for image in images if isinstance(image, PreparedImage)]
    if not prepared:
        return backbone.build_inputs(processor, list(images), prompts, requests)
    if len(prepared) != len(images):
        raise ValueError("a batch mixes prepared and plain images")
    from PIL import Image

    height, width = prepared[0].pixel_values.shape[-2:]
    stand_ins = [Image.new("RGB", (int(width), int(height))) for _ in images]
    inputs = dict(backbone.build_inputs(processor, stand_ins, prompts, requests))
    pixels = torch.cat([image.pixel_values for image in prepared])
    if tuple(inputs["pixel_values"].shape) != tuple(pixels.shape):
        given = tuple(inputs["pixel_values"].shape)
        raise ValueError(f"prepared images of shape {tuple(pixels.shape)}, the processor gives {given}")
    inputs["pixel_values"] = pixels
    return inputs


def generate_answers(
    model: Any,
    processor: Any,
    backbone: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    requests: Sequence[str],
    max_new_tokens: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    end_of_turn: str | None = None,
    streamer: Any = None,
    stopping_criteria: Any = None,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy answers to one batch: ``prompts`` (rendered with the chat template) about ``images``
    (RGB, or all ``PreparedImage``; one per prompt that holds an image), left-padded; ``requests``
    are the plain instructions (InstructBLIP's Q-Former reads them). Decoding stops at the
    template's ``end_of_turn`` token (:func:`m2pt_cli.chat.end_of_turn`) or the tokenizer's end of
    sequence. Returns the decoded new
    tokens, special tokens dropped.

    ``streamer`` (a transformers ``BaseStreamer``) receives the padded prompt ids, then each step's
    new token ids for the whole batch; ``stopping_criteria`` (a ``StoppingCriteriaList``) can end
    rows early (a finished row is padded, as at end of turn, and does not change the others);
    ``stop_strings`` end a row once its text ends with one of them (transformers'
    ``StopStringCriteria``, which matches across token boundaries): the answer still holds the stop
    string, so callers cut at it, and a row no longer decodes to ``max_new_tokens`` past it."""
    tokenizer = processor.tokenizer
    if stop_strings:
        from transformers import StoppingCriteriaList, StopStringCriteria

        stopping_criteria = StoppingCriteriaList(
            [*(stopping_criteria or []), StopStringCriteria(tokenizer, list(stop_strings))]
        )
    stop = [tokenizer.convert_tokens_to_ids(end_of_turn)] if end_of_turn else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    was_training = model.training
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    try:
        inputs = _inputs(backbone, processor, images, list(prompts), list(requests))
        device = next(model.parameters()).device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        with torch.no_grad(), autocast():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop or None,
                streamer=streamer,
                stopping_criteria=stopping_criteria,
            )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class LoadedModel:
    """A base model with M²PT attached, and everything needed to ask it questions.

    Unpacks as ``(model, processor)``, as ``m2pt_cli.load`` returned in m2pt 0.1.

    Attributes:
        model: the ``M2PTModel``.
        processor: the base model's processor (tokenizer and image preprocessing).
        recipe: the resolved recipe (the adapter's own, with any overrides).
        backbone: the registry's backbone for ``recipe.model.backbone``.
        adapter: the adapter folder loaded into ``model`` (None: none).
        adapter_meta: its ``m2pt_adapter.json``, checksum verified once.
    """

    model: Any
    processor: Any
    recipe: Recipe
    backbone: Any
    adapter: Path | None = None
    adapter_meta: dict[str, Any] | None = field(default=None, repr=False)

    def __iter__(self):
        return iter((self.model, self.processor))

    @property
    def template(self) -> str:
        """The chat template name the recipe trained with."""
        return self.recipe.model.chat_template

    @property
    def autocast(self) -> Callable[[], AbstractContextManager]:
        device_type = next(self.model.parameters()).device.type
        return autocast_for(precision_of(self.recipe), device_type)

    @functools.cached_property
    def end_of_turn(self) -> str:
        """The special token that ends a reply in the recipe's chat template (decoding stops there)."""
        return end_of_turn(self.processor, self.template)

    def prompt(self, question: str) -> str:
        """The generation prompt for one image and ``question``, in the recipe's chat template."""
        return question_prompt(self.processor, self.backbone, question, self.template)

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        requests: Sequence[str],
        max_new_tokens: int,
        streamer: Any = None,
        stopping_criteria: Any = None,
        stop_strings: Sequence[str] = (),
    ):
        """``generate_answers`` for one batch of already rendered ``prompts`` (see there for
        ``streamer``, ``stopping_criteria`` and ``stop_strings``)."""
        return generate_answers(
            self.model,
            self.processor,
            self.backbone,
            images,
            prompts,
            requests,
            max_new_tokens,
            self.autocast,
            self.end_of_turn,
            streamer,
            stopping_criteria,
            stop_strings,
        )

    def answer(
        self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8
    ) -> list[str]:
        """Greedy answers to ``questions``, one RGB image each, in batches of ``batch_size``."""
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            batch = list(questions[start : start + batch_size])
            prompts = [self.prompt(question) for question in batch]
            answers += self.generate(images[start : start + batch_size], prompts, batch, max_new_tokens)
        return answers
