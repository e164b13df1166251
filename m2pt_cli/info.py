"""What a recipe builds: towers, prompts, trainable parameters, without loading weights."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from m2pt_cli.config import COMMON_MODEL_KEYS, Recipe
from m2pt_cli.errors import QUOTE_CHARS, quote


def _span(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _value(value: Any) -> str:
    """A key's value as a recipe writes it (``''``, ``null``, ``true``, ``[1, 2]``)."""
    if isinstance(value, str):
        return quote(value, bare=True) if value else "''"
    text = json.dumps(value)  # escapes control characters
    return text if len(text) <= QUOTE_CHARS else quote(value)


def describe(recipe: Recipe) -> dict[str, Any]:
    """Build the recipe's model on the meta device and report its shape and parameter counts."""
    from m2pt_cli import quantization
    from m2pt_cli.loading import build, trained_modules

    model, _ = build(recipe, empty=True)
    trained = trained_modules(recipe, model.backbone, model.base)
    keep = quantization.full_precision_names(model.base, list(trained.values()))
    cfg = model.m2pt_config
    groups = model.parameter_groups()
    trainable = sum(groups.values())
    base_total = model.base_parameter_count()
    # Trained modules are part of the base; prompts are extra.
    total = base_total + groups["vision_prompts"] + groups["text_prompts"]
    return {
        "recipe": recipe.name,
        "backbone": recipe.model.backbone,
        "model": recipe.model.name_or_path,
        # the keys the backbone declares besides the common ones (openclip_vicuna's tower and projector)
        "model_keys": {
            f.name: getattr(recipe.model, f.name)
            for f in dataclasses.fields(recipe.model)
            if f.name not in COMMON_MODEL_KEYS
        },
        "vision": {
            "layers": cfg.vision_total_layers,
            "width": cfg.vision_width,
            "prompt_length": cfg.vision_length,
            "prompt_layers": cfg.vision_layers,
            "unused_layers": cfg.vision_unused_layers,
        },
        "text": {
            "layers": cfg.text_total_layers,
            "width": cfg.text_width,
            "prompt_length": cfg.text_length,
            "prompt_layers": cfg.text_layers,
        },
        "trainable": groups,
        "trainable_total": trainable,
        "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "quantization": recipe.model.quantization,
        "dtype": recipe.model.dtype,
        # the base's weights as each model.quantization mode stores them (trained modules in full precision)
        "weight_bytes": {mode: quantization.weight_bytes(model.base, mode, keep) for mode in quantization.MODES},
    }


def format_report(info: dict[str, Any]) -> str:
    """The report ``m2pt info`` prints."""
    v, t = info["vision"], info["text"]
    lines = [
        f"recipe      {quote(info['recipe'], bare=True)}",
        f"backbone    {info['backbone']}",
        f"model       {quote(info['model'], bare=True)}",
        *(f"            {key}: {_value(value)}" for key, value in info.get("model_keys", {}).items()),
        f"vision      {v['layers']} layers x {v['width']} wide; prompts: {v['prompt_length']} per layer "
        f"in {len(v['prompt_layers'])} layers ({_span(v['prompt_layers'])})",
    ]
    for layer in v["unused_layers"]:
        if layer not in v["prompt_layers"]:
            lines.append(f"            layer {layer} left out: its output never reaches the language model")
    lines.append(
        f"text        {t['layers']} layers x {t['width']} wide; prompts: {t['prompt_length']} per layer "
        f"in {len(t['prompt_layers'])} layers ({_span(t['prompt_layers'])})"
    )
    lines.append("trainable")
    names = {"vision_prompts": "visual prompts", "text_prompts": "text prompts"}
    for group, count in info["trainable"].items():
        lines.append(f"  {names.get(group, group):<16}{count:>16,}")
    lines.append(f"  {'total':<16}{info['trainable_total']:>16,}")
    lines.append(f"parameters  {info['total_parameters']:,} in all; trainable {info['trainable_percent']:.4f} %")
    sizes = "; ".join(
        f"{info['dtype'] if mode == 'none' else mode} {_bytes(size)}" for mode, size in info["weight_bytes"].items()
    )
    lines.append(f"weights     {sizes} (model.quantization: {info['quantization']})")
    return "\n".join(lines)
