"""From a recipe to a model: registry lookup, base loading, layer resolution, adapter attachment."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from m2pt_cli import base_origin, devices, gguf_files, hf_conventions, quantization, trust
from m2pt_cli import config as recipe_config
from m2pt_cli.backbones.base import BackboneError
from m2pt_cli.config import Recipe
from m2pt_cli.errors import UserError, did_you_mean, first_line, quote
from m2pt_cli.model import M2PTConfig, M2PTModel
from m2pt_cli.registry import BACKBONES

log = logging.getLogger("m2pt")


def _check_source(recipe: Recipe) -> None:
    """Refuse a local base that is not a model folder (missing, a file, or without ``config.json``)."""
    path = recipe.model.name_or_path
    if gguf_files.is_gguf(path):  # a file, checked where it is read
        return
    looks_local = path.startswith(("/", ".", "~")) or Path(path).exists()
    if not looks_local:
        return  # a hub id
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"model.name_or_path: folder {quote(path)} {what}")
    if not (folder / "config.json").is_file():
        raise UserError(
            f"model.name_or_path: {quote(path)} is not a model folder (it holds no config.json); name a "
            "Hugging Face model folder, a hub id or a .gguf file"
        )


def check_model_keys(recipe: Recipe, backbone) -> None:
    """Refuse a ``model`` section that does not hold the keys ``backbone`` declares: one set to a key
    only another backbone reads (rather than ignoring it), or one lacking this backbone's keys (a
    recipe changed in Python after ``config.load``, which builds the section for its backbone)."""
    recipe_config.check_model_section(recipe.model, backbone)


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
    if recipe.method == "lora" and recipe.lora.rank > text.width:
        raise UserError(
            f"lora.rank: {recipe.lora.rank} is over the language model's width ({text.width}); "
            "a LoRA rank above it adds values without adding rank"
        )
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


def trained_modules(recipe: Recipe, backbone, base) -> dict[str, Any]:
    """The modules (or parameters) of ``base`` that ``recipe`` trains, by name."""
    return {name: backbone.module(base, name) for name in trainable_modules(recipe)}


def add_lora(base, backbone, cfg, trainable: list[str]) -> None:
    """Inject PEFT LoRA layers into the LLM's ``cfg.target_modules`` (the LoRA baseline).

    PEFT freezes every parameter that is not a LoRA weight; the recipe's ``trainable`` modules
    (the projector) are marked trainable again so that they train beside LoRA, as they do beside
    the prompts."""
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
    for name in trainable:
        backbone.module(base, name).requires_grad_(True)


def model_source(recipe: Recipe, empty: bool = False):
    """The recipe's ``model`` section as the backbone sees it: ``trust_remote_code`` is what the person
    running m2pt granted (``trust.remote_code``), never what the file says; ``empty`` (``m2pt info``)
    never runs model code. A GGUF file (:mod:`m2pt_cli.gguf_files`) becomes its converted folder.

    Raises:
        UserError: the recipe says the model needs its own code and nobody granted it; a GGUF file
            that is missing or unreadable.
    """
    granted = trust.remote_code_granted() and not empty
    if recipe.model.trust_remote_code and not granted and not empty:
        raise UserError(
            f"model.trust_remote_code: {recipe.model.name_or_path!r} needs Python code from its repository; "
            f"m2pt runs it only when you pass {trust.FLAG} (a recipe or adapter cannot allow it)"
        )
    name_or_path = recipe.model.name_or_path
    if gguf_files.is_gguf(name_or_path):  # one GGUF file: its converted folder, cached
        name_or_path = str(gguf_files.hf_folder(name_or_path))
    return dataclasses.replace(recipe.model, trust_remote_code=granted, name_or_path=name_or_path)


def _needs_code(exc: ValueError, recipe: Recipe, empty: bool) -> UserError | None:
    """A one-line error when transformers refused a checkpoint because it needs its own code."""
    if not hf_conventions.needs_remote_code(exc):
        return None
    fix = "m2pt info never runs model code" if empty else f"pass {trust.FLAG} if you trust it"
    return UserError(
        f"model.name_or_path: {recipe.model.name_or_path!r} needs Python code from its repository to load; {fix}"
    )


@contextmanager
def _loading_errors(recipe: Recipe, empty: bool) -> Iterator[None]:
    """Turn what loading a base raises for bad input into one-line ``UserError``s."""
    try:
        yield
    except BackboneError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # hub id unknown or unreachable, gated repository, missing files
        raise UserError(f"model.name_or_path: cannot load {recipe.model.name_or_path!r}: {first_line(exc)}") from None
    except ValueError as exc:
        refusal = _needs_code(exc, recipe, empty)
        if refusal is None:
            raise
        raise refusal from None


def full_precision(recipe: Recipe, backbone, skeleton) -> list[str]:
    """What a quantized load of ``recipe`` keeps in full precision (its trained modules and output
    layers), found on the model built on the meta device (``skeleton``)."""
    trained = trained_modules(recipe, backbone, skeleton)
    quantization.refuse_whole_models(skeleton, trained, recipe.model.quantization)
    return quantization.full_precision_names(skeleton, list(trained.values()))


def load_processor(recipe: Recipe) -> Any:
    """The recipe's processor alone, without the model's weights (``m2pt data``)."""
    backbone = BACKBONES.get(recipe.model.backbone)
    check_model_keys(recipe, backbone)
    _check_source(recipe)
    with _loading_errors(recipe, empty=False):
        return backbone.load_processor(model_source(recipe))


def build(recipe: Recipe, device: str = "cpu", empty: bool = False) -> tuple[M2PTModel, Any]:
    """Load the recipe's base model (or build it on the meta device) and attach M²PT.

    Returns:
        (model, processor); the processor is None when ``empty``.
    """
    backbone = BACKBONES.get(recipe.model.backbone)
    check_model_keys(recipe, backbone)
    _check_source(recipe)
    source = model_source(recipe, empty)
    mode = recipe.model.quantization
    with _loading_errors(recipe, empty):
        if empty:
            base, processor = backbone.build_empty(source), None
        else:
            quantization.require(mode, device)
            devices.require_attention(recipe.model.attn_implementation, recipe.model.dtype, device)
            skeleton = backbone.build_empty(source)  # from the config alone: no weights read, nothing allocated
            resolve(recipe, backbone, skeleton)  # layers, modules and sizes fit this model, before its weights load
            keep = full_precision(recipe, backbone, skeleton) if mode != "none" else []
            with quantization.keeping(keep):
                loaded = backbone.load(source, device=device)
            base, processor = loaded.model, loaded.processor
            quantization.prepare(base, mode, trained_modules(recipe, backbone, base), recipe.model.backbone)
    inits = recipe.prompts.vision.init, recipe.prompts.text.init
    model = M2PTModel(base, backbone, resolve(recipe, backbone, base), *inits, seed=recipe.seed)
    if recipe.method == "lora":
        add_lora(base, backbone, recipe.lora, model.m2pt_config.trainable)
    if not empty:
        model.to(device)
    return model, processor


def check_own_base(
    recipe: Recipe, recipe_file: Path, adapter: str | Path | None, raw: dict[str, Any] | None = None
) -> None:
    """Refuse a base model that the adapter being loaded (or its run folder) carries when the
    adapter's own recipe names it (:mod:`m2pt_cli.base_origin`): files a stranger sent must not
    choose the model that runs. Naming the base yourself (``base``, or a recipe of your own) lifts this.
    ``raw``: the recipe file as ``config.read_yaml`` read it (read here when not given)."""
    from m2pt_cli import adapter as adapter_files

    if not adapter_files.belongs_to_adapter(recipe_file):
        return  # your own recipe names the base
    keys = ["name_or_path"] + [f.name for f in dataclasses.fields(recipe.model) if f.metadata.get("path")]
    written = (raw if raw is not None else recipe_config.read_yaml(recipe_file)).get("model")
    written = written if isinstance(written, dict) else {}
    paths = {key: getattr(recipe.model, key) for key in keys}
    base_origin.check_carried(paths, written, recipe_file, Path(adapter) if adapter is not None else None)


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


def check_adapter(
    recipe: Recipe, folder: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None
) -> None:
    """Refuse an adapter that does not fit the recipe's model before anything is loaded or allocated:
    its metadata and tensor shapes (read from the safetensors header alone; ``shapes``: as
    ``adapter.tensor_shapes`` already read them) against the model built on the meta device, so a
    small file cannot make m2pt allocate what it only claims."""
    from m2pt_cli import adapter as adapter_files

    backbone = BACKBONES.get(recipe.model.backbone)
    check_model_keys(recipe, backbone)
    _check_source(recipe)
    if shapes is None:
        shapes = adapter_files.tensor_shapes(folder)  # bounded: count, names, sizes (adapter.read_header)
    with _loading_errors(recipe, empty=False):
        base = backbone.build_empty(model_source(recipe))
    here = resolve(recipe, backbone, base)
    check_fits(folder, meta, shapes, here)
    # an adapter holds prompts and some of the base's tensors (trained modules), or LoRA factors (of a rank
    # at most the layer's width: at most twice the layer's values): never more values than that
    need = (3 if recipe.method == "lora" else 1) * sum(p.numel() for p in base.parameters()) + sum(
        len(layers) * length * width
        for layers, length, width in (
            (here.vision_layers, here.vision_length, here.vision_width),
            (here.text_layers, here.text_length, here.text_width),
        )
    )
    held = sum(math.prod(shape) for shape in shapes.values())
    if held > need:
        raise UserError(
            f"{folder}: {adapter_files.WEIGHTS} holds {held:,} values; the whole model it adapts has {need:,}"
        )


def check_fits(folder: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], here: M2PTConfig) -> None:
    """Raise a ``UserError`` naming the first thing in which an adapter differs from ``here``."""
    from m2pt_cli.adapter import WEIGHTS

    trained_for, wanted = meta.get("m2pt_config"), here.to_dict()
    trained_for = trained_for if isinstance(trained_for, dict) else {}
    for key in MATCHING_KEYS:
        if key in trained_for and trained_for[key] != wanted[key]:
            raise UserError(
                f"{folder}: adapter was trained for {key} = {quote(trained_for[key])}, this model has {wanted[key]}"
            )
    prompts = {
        "vision_prompts": (len(here.vision_layers), here.vision_length, here.vision_width),
        "text_prompts": (len(here.text_layers), here.text_length, here.text_width),
    }
    for name, shape in prompts.items():
        held = shapes.get(name)
        if (held is None and math.prod(shape)) or (held is not None and tuple(held) != shape):
            what = f"holds {name} of shape {tuple(held)}" if held is not None else f"holds no {name}"
            raise UserError(f"{folder}: {WEIGHTS} {what}; this model needs {shape}")


def attach_adapter(
    model: M2PTModel, folder: Path, state: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
) -> None:
    """Load an adapter folder (or its ``state`` and ``meta``, already read from ``folder``) into
    ``model`` after checking that it was trained for this base."""
    from m2pt_cli import adapter as adapter_files

    if state is None or meta is None:
        folder = adapter_files.find_adapter(Path(folder))
        state, meta = adapter_files.read_adapter(folder)
    check_fits(folder, meta, {key: tuple(value.shape) for key, value in state.items()}, model.m2pt_config)
    try:
        unknown = model.load_adapter_state_dict(state)
    except ValueError as exc:
        raise UserError(f"{folder}: {exc}") from None
    if unknown:
        more = f" and {len(unknown) - 5:,} more" if len(unknown) > 5 else ""
        names = ", ".join(quote(name, bare=True) for name in unknown[:5])
        log.warning("%s: ignoring %d unknown adapter tensors: %s%s", folder, len(unknown), names, more)
