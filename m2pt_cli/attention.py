"""``m2pt attention``: how much attention the last layers pay to the prompts (the paper's activation maps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from m2pt_cli.chat import question_prompt
from m2pt_cli.errors import UserError


def _block(layer: int, chosen: list[int], total: int, tower: str, unused: tuple[int, ...] = ()) -> int:
    """``-1``: the last block holding prompts (else the last block that runs); otherwise that block
    index. Blocks in ``unused`` never run (their output never reaches the language model)."""
    if layer == -1:
        return chosen[-1] if chosen else max(i for i in range(total) if i not in unused)
    if not -total <= layer < total:
        raise UserError(f"--layer: {layer} is out of range; the {tower} tower has {total} layers")
    if layer % total in unused:
        raise UserError(
            f"--layer: {tower} layer {layer % total} never runs (its output never reaches the language model); "
            f"choose one below {min(unused)}"
        )
    return layer % total


def shares(model, processor, backbone, template: str, image, prompt: str, layer: int = -1) -> dict[str, Any]:
    """Per-head share of attention mass on prompts and other tokens, averaged over real-token queries.

    Needs eager attention (the kernels that return attention weights). Vision: prompts vs the image
    tokens; language model: prompts vs image tokens vs text tokens. Each head's shares sum to 1.
    """
    cfg = model.m2pt_config
    vision, text = backbone.vision_tower(model.base), backbone.language_tower(model.base)
    v_index = _block(layer, cfg.vision_layers, len(vision.blocks), "vision", vision.unused_layers)
    t_index = _block(layer, cfg.text_layers, len(text.blocks), "text")
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                captured[name] = output[1].detach().float().cpu()

        return hook

    if not hasattr(vision.blocks[v_index], "self_attn") or not hasattr(text.blocks[t_index], "self_attn"):
        raise UserError(
            f"m2pt attention: backbone {cfg.backbone!r} does not expose attention weights "
            "(it needs transformers attention modules, as llava and instructblip have)"
        )
    handles = [
        vision.blocks[v_index].self_attn.register_forward_hook(keep("vision")),
        text.blocks[t_index].self_attn.register_forward_hook(keep("text")),
    ]
    rendered = question_prompt(processor, backbone, prompt, template)
    inputs = backbone.build_inputs(processor, [image], [rendered], [prompt])
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(**{key: value.to(device) for key, value in inputs.items()})
    finally:
        for handle in handles:
            handle.remove()
    if set(captured) != {"vision", "text"}:
        raise UserError("attention weights were not returned; load the model with model.attn_implementation=eager")
    nv = cfg.vision_length if v_index in cfg.vision_layers else 0
    nt = cfg.text_length if cfg.text_layers else 0
    weights = captured["vision"][0]  # (H, T + Nv, T + Nv); prompts are the last Nv keys
    real = weights[:, : weights.shape[1] - nv]
    v_prompt = real[:, :, weights.shape[2] - nv :].sum(-1).mean(-1) if nv else torch.zeros(real.shape[0])
    v_other = real[:, :, : weights.shape[2] - nv].sum(-1).mean(-1)
    weights = captured["text"][0]  # (H, Nt + T, Nt + T); prompts are the first Nt keys
    ids = inputs["input_ids"][0]
    is_image = torch.cat([torch.zeros(nt, dtype=torch.bool), ids == backbone.image_token_id(processor)])
    rows = weights[:, nt:]  # real-token queries
    t_prompt = rows[:, :, :nt].sum(-1).mean(-1)
    t_image = rows[:, :, is_image].sum(-1).mean(-1)
    t_text = rows[:, :, nt:][:, :, ~is_image[nt:]].sum(-1).mean(-1)
    return {
        "vision": {
            "layer": v_index,
            "prompts": cfg.vision_length if nv else 0,
            "prompt_share": v_prompt.tolist(),
            "other_share": v_other.tolist(),
        },
        "text": {
            "layer": t_index,
            "prompts": nt,
            "prompt_share": t_prompt.tolist(),
            "image_share": t_image.tolist(),
            "text_share": t_text.tolist(),
        },
    }


def figure(result: dict[str, Any], title: str, path: Path) -> Path:
    """Stacked bars per head: attention share on prompts vs image vs text tokens, per tower."""
    from m2pt_cli.plots import SIZE_INCHES, _pyplot, _save

    plt = _pyplot()
    fig, (v_ax, t_ax) = plt.subplots(1, 2, figsize=SIZE_INCHES)
    v = result["vision"]
    heads = range(len(v["prompt_share"]))
    v_ax.bar(heads, v["prompt_share"], color="#d62728", label=f"visual prompts ({v['prompts']})")
    v_ax.bar(heads, v["other_share"], bottom=v["prompt_share"], color="#9ecae1", label="image tokens")
    v_ax.set_title(f"vision encoder, layer {v['layer']}", fontsize=9)
    t = result["text"]
    heads = range(len(t["prompt_share"]))
    t_ax.bar(heads, t["prompt_share"], color="#2ca02c", label=f"text prompts ({t['prompts']})")
    t_ax.bar(heads, t["image_share"], bottom=t["prompt_share"], color="#9ecae1", label="image tokens")
    bottom = [a + b for a, b in zip(t["prompt_share"], t["image_share"], strict=True)]
    t_ax.bar(heads, t["text_share"], bottom=bottom, color="#c7c7c7", label="text tokens")
    t_ax.set_title(f"language model, layer {t['layer']}", fontsize=9)
    for ax in (v_ax, t_ax):
        ax.set_xlabel("attention head")
        ax.set_ylabel("share of attention mass (0-1)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}: attention on prompts")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def run(
    source: Path, image_path: Path, prompt: str, layer: int, output: Path | None, device: str = "cpu"
) -> tuple[dict, Path]:
    """Load the adapter with eager attention, measure, write PNG and JSON."""
    from m2pt_cli.data.collate import open_image
    from m2pt_cli.files import refuse_link, write_text_atomic
    from m2pt_cli.model_source import resolve_model_source

    resolved = resolve_model_source(source, overrides=("model.attn_implementation=eager",))
    output = output or resolved.adapter.parent / "attention.png"
    for path in (output, output.with_suffix(".json")):  # checked before the model loads
        refuse_link(path)
    loaded = resolved.load(device=device)
    image = open_image({"path": str(image_path)}, str(image_path), loaded.recipe.data.max_image_pixels)
    result = shares(loaded.model, loaded.processor, loaded.backbone, loaded.template, image, prompt, layer)
    figure(result, loaded.recipe.name, output)
    write_text_atomic(output.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    return result, output
