"""What each benchmarked method is: its recipe overrides, its model built for training, a synthetic
batch, one training step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from m2pt_cli import config as recipe_config
from m2pt_cli.config import Recipe
from m2pt_cli.errors import UserError

METHODS = ("m2pt", "lora", "full", "vision-only", "text-only", "floor", "limit")


FROZEN = ("floor", "limit")  # nothing trained: the floors a method's step time is held to


METHOD_OVERRIDES = {
    "m2pt": (),
    "lora": ("method=lora",),
    "full": ("method=full",),
    "vision-only": ("prompts.text.length=0",),
    "text-only": ("prompts.vision.length=0",),
    # every weight frozen, gradients flow back to the inputs of both towers: the floor of any method
    # with prompts in the vision encoder (they sit in its first layer, so back-propagation runs through it)
    "floor": ("prompts.vision.length=0", "prompts.text.length=0", "trainable=[]"),
    # every weight frozen, gradients flow back to the LLM's input embeddings only: the floor of text prompts
    "limit": ("prompts.vision.length=0", "prompts.text.length=0", "trainable=[]"),
}


@dataclass
class Shapes:
    batch_size: int
    seq_len: int


def split_method(name: str) -> tuple[str, tuple[str, ...]]:
    """A ``--methods`` entry as (method, overrides): ``m2pt@4bit`` is m2pt on a 4-bit base
    (``model.quantization``), so quantization modes are timed side by side like methods."""
    method, at, mode = name.partition("@")
    if method not in METHOD_OVERRIDES:
        raise UserError(f"--methods: {method!r} is not a method (allowed: {', '.join(METHODS)})")
    if at and mode not in recipe_config.QUANTIZATION_MODES:
        allowed = ", ".join(recipe_config.QUANTIZATION_MODES)
        raise UserError(f"--methods: {name!r}: {mode!r} is not a model.quantization mode (allowed: {allowed})")
    return method, METHOD_OVERRIDES[method] + ((f"model.quantization={mode}",) if at else ())


def method_recipe(recipe_path: Path, method: str, overrides: tuple[str, ...]) -> Recipe:
    return recipe_config.load(recipe_path, tuple(overrides) + split_method(method)[1])


def build_method(recipe_path: Path, method: str, overrides: tuple[str, ...], device: str):
    """(model, processor, optimizer or None) for one method, in training mode."""
    from m2pt_cli.loading import build

    recipe = method_recipe(recipe_path, method, overrides)
    model, processor = build(recipe, device=device)
    model.train()
    if recipe.train.gradient_checkpointing:  # as m2pt train runs the recipe
        model.activation_checkpointing_enable()
    method = split_method(method)[0]
    if method in FROZEN:
        embed = model.backbone.language_tower(model.base).embed
        embed.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    if method == "floor":
        first_block = model.backbone.vision_tower(model.base).blocks[0]
        first_block.register_forward_pre_hook(_hidden_states_need_grad, with_kwargs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, processor, optimizer


def _hidden_states_need_grad(module, args: tuple, kwargs: dict) -> None:
    """Make the hidden states entering a block a leaf that needs gradients (the floor's vision input)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and not hidden.requires_grad:
        hidden.requires_grad_(True)


def synthetic_batch(model, processor, shapes: Shapes, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens of the recipe's shapes with one noise image per sample, labels on every text token.

    The image tokens sit where the backbone puts them (``backbone.place_image_tokens`` on a bare
    image placeholder); random token ids fill the rest of ``seq_len``.
    """
    backbone = model.backbone
    generator = torch.Generator().manual_seed(seed)
    image_id = backbone.image_token_id(processor)
    placeholder = "<image>" if backbone.image_in_text else ""
    head = backbone.place_image_tokens(processor, processor.tokenizer(placeholder)["input_ids"])
    if shapes.seq_len <= len(head) + 1:
        raise UserError(f"--seq-len: {shapes.seq_len} leaves no text after {len(head)} image and start tokens")
    vocab = backbone.language_tower(model.base).embed.num_embeddings
    ids = torch.randint(10, vocab, (shapes.batch_size, shapes.seq_len), generator=generator)
    ids[ids == image_id] = 10
    ids[:, : len(head)] = torch.tensor(head)
    labels = ids.clone()
    labels[:, : len(head)] = -100
    images = noise_images(shapes.batch_size, generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch.update(backbone.image_inputs(processor, images, ["Describe the image."] * shapes.batch_size))
    return {k: v.to(device) for k, v in batch.items()}


def noise_images(count: int, seed: int = 0, generator: torch.Generator | None = None) -> list:
    """``count`` RGB noise images of 64 x 64 pixels (the processor resizes them), seeded."""
    from PIL import Image

    generator = generator or torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (count, 64, 64, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(n.numpy()) for n in noise]


def train_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def optimizer_bytes(optimizer) -> int:
    if optimizer is None:
        return 0
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
