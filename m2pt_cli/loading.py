"""From a recipe to a model: registry lookup, base loading, layer resolution, adapter attachment."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from backbones.base import BackboneError
from m2pt_cli import config as recipe_config
from m2pt_cli.config import Recipe
from m2pt_cli.errors import UserError, did_you_mean, first_line
from m2pt_cli.model import M2PTConfig, M2PTModel
from m2pt_cli.registry import BACKBONES

log = logging.getLogger("m2pt")


def _check_source(recipe: Recipe) -> None:
    path = recipe.model.name_or_path
    looks_local = path.startswith(("/", ".", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise UserError(f"model.name_or_path: folder {path!r} does not exist")


def check_model_keys(recipe: Recipe, backbone) -> None:
    """Refuse ``model`` keys that only another backbone reads (rather than ignoring them)."""
    import dataclasses

    for key in recipe_config.BACKBONE_MODEL_KEYS:
        default = next(f.default for f in dataclasses.fields(recipe.model) if f.name == key)
        if key not in backbone.model_keys and getattr(recipe.model, key) != default:
            raise UserError(
                f"model.{key}: backbone {recipe.model.backbone!r} does not read it (its checkpoint fixes this part); "
                "remove the key or use backbone openclip_vicuna"
            )


def resolve(recipe: Recipe, backbone, base) -> M2PTConfig:
    """The adapter config of ``recipe`` on ``base`` (layer specs checked against the model)."""
    unknown = [n for n in recipe.trainable if n not in backbone.trainable_modules]
    if unknown:
        allowed = backbone.trainable_modules
        raise UserError(
            f"trainable: {unknown[0]!r} is not a module of backbone {recipe.model.backbone!r}"
            f"{did_you_mean(unknown[0], allowed)} (allowed: {', '.join(allowed)})"
        )
    vision, text = backbone.vision_tower(base), backbone.language_tower(base)
    p = recipe.prompts
    if recipe.method != "m2pt":  # baselines: no prompts
        p = type(p)(vision=type(p.vision)(length=0), text=type(p.text)(length=0))
    vision_layers = recipe_config.resolve_layers(
        p.vision.layers, len(vision.blocks), vision.unused_layers, "prompts.vision.layers"
    )
    text_layers = recipe_config.resolve_layers(p.text.layers, len(text.blocks), (), "prompts.text.layers")
    if p.vision.length == 0:
        vision_layers = []
    if p.text.length == 0:
        text_layers = []
    subset = text_layers and len(text_layers) < len(text.blocks)
    if subset and text.attn_implementation not in ("sdpa", "eager"):
        raise UserError(
            "prompts.text.layers: prompts on a subset of layers need model.attn_implementation sdpa or eager, "
            f"not {text.attn_implementation}"
        )
    return M2PTConfig(
        backbone=recipe.model.backbone,
        vision_layers=vision_layers,
        vision_length=p.vision.length,
        vision_width=vision.width,
        vision_total_layers=len(vision.blocks),
        text_layers=text_layers,
        text_length=p.text.length,
        text_width=text.width,
        text_total_layers=len(text.blocks),
        trainable=trainable_modules(recipe),
        vision_unused_layers=list(vision.unused_layers),
    )


def trainable_modules(recipe: Recipe) -> list[str]:
    """The recipe's ``trainable`` list, plus the LLM for ``method: full``."""
    names = list(recipe.trainable)
    if recipe.method == "full" and "language_model" not in names:
        names.append("language_model")
    return names


def add_lora(base, backbone, cfg) -> None:
    """Inject PEFT LoRA layers into the LLM's ``cfg.target_modules`` (the LoRA baseline)."""
    from peft import LoraConfig, inject_adapter_in_model

    stack = backbone.language_tower(base).stack
    prefix = next(name for name, module in base.named_modules() if module is stack)
    pattern = rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, cfg.target_modules))})"
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern)
    try:
        inject_adapter_in_model(config, base)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {first_line(exc)}") from None
    for name, param in base.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)


def build(recipe: Recipe, device: str = "cpu", empty: bool = False) -> tuple[M2PTModel, Any]:
    """Load the recipe's base model (or build it on the meta device) and attach M²PT.

    Returns:
        (model, processor); the processor is None when ``empty``.
    """
    backbone = BACKBONES.get(recipe.model.backbone)
    check_model_keys(recipe, backbone)
    _check_source(recipe)
    try:
        if empty:
            base, processor = backbone.build_empty(recipe.model), None
        else:
            loaded = backbone.load(recipe.model, device=device)
            base, processor = loaded.model, loaded.processor
    except BackboneError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # hub id unknown or unreachable, gated repository, missing files
        raise UserError(f"model.name_or_path: cannot load {recipe.model.name_or_path!r}: {first_line(exc)}") from None
    inits = recipe.prompts.vision.init, recipe.prompts.text.init
    model = M2PTModel(base, backbone, resolve(recipe, backbone, base), *inits, seed=recipe.seed)
    if recipe.method == "lora":
        add_lora(base, backbone, recipe.lora)
    if not empty:
        model.to(device)
    return model, processor


def load(
    source: str | Path,
    adapter: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    overrides: tuple[str, ...] = (),
    base: str | None = None,
) -> tuple[M2PTModel, Any]:
    """Load a model with M²PT attached.

    Args:
        source: a recipe YAML file, or an adapter folder (exported, a run's ``adapter/``, a
            checkpoint, or a run folder).
        adapter: an adapter folder to load on top of a recipe ``source``.
        device: where to put the model.
        dtype: overrides ``model.dtype``.
        overrides: ``key=value`` recipe overrides.
        base: another hub id or folder for the base model (e.g. where you keep the weights).
    Returns:
        (model, processor).
    Raises:
        UserError: bad recipe, or an adapter that does not fit the base (names what differs).
    """
    from m2pt_cli import adapter as adapter_files

    extra = tuple(overrides)
    extra += (f"model.dtype={dtype}",) if dtype else ()
    extra += (f"model.name_or_path={base}",) if base else ()
    source = Path(source)
    if source.is_dir():
        adapter = adapter_files.find_adapter(source)
        recipe = recipe_config.load(adapter_files.recipe_of(adapter), extra)
    else:
        recipe = recipe_config.load(source, extra)
    model, processor = build(recipe, device=device)
    if adapter is not None:
        attach_adapter(model, Path(adapter))
    return model, processor


# What must agree between an adapter and the model it is loaded into.
MATCHING_KEYS = (
    "backbone",
    "vision_width",
    "vision_total_layers",
    "text_width",
    "text_total_layers",
    "vision_layers",
    "text_layers",
    "vision_length",
    "text_length",
    "trainable",
)


def attach_adapter(model: M2PTModel, folder: Path) -> None:
    """Load an adapter folder into ``model`` after checking that it was trained for this base."""
    from m2pt_cli import adapter as adapter_files

    folder = adapter_files.find_adapter(folder)
    state, meta = adapter_files.read_adapter(folder)
    trained_for = meta.get("m2pt_config", {})
    here = model.m2pt_config.to_dict()
    for key in MATCHING_KEYS:
        if key in trained_for and trained_for[key] != here[key]:
            raise UserError(f"{folder}: adapter was trained for {key} = {trained_for[key]}, this model has {here[key]}")
    try:
        unknown = model.load_adapter_state_dict(state)
    except ValueError as exc:
        raise UserError(f"{folder}: {exc}") from None
    if unknown:
        log.warning("%s: ignoring unknown adapter tensors: %s", folder, ", ".join(unknown))
