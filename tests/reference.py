"""Independent re-implementations of M²PT on LLaVA, written straight from ../shared/M2PT.md.

They call the base model's own blocks one by one, so they share its weights but none of m2pt's
hook machinery.
"""

from __future__ import annotations

import torch


def _causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()[None, None]


def image_features_official(base, pixel_values, prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Official scheme: prompts inserted after CLS at the input, overwritten before every chosen layer.

    Only valid when every layer up to the feature layer holds prompts.
    """
    tower = base.model.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    n = next(iter(prompts.values())).shape[0]
    batch = hidden.shape[0]
    hidden = torch.cat([hidden[:, :1], hidden.new_zeros(batch, n, hidden.shape[-1]), hidden[:, 1:]], dim=1)
    states = [torch.cat([hidden[:, :1], hidden[:, 1 + n :]], dim=1)]
    for i, layer in enumerate(tower.encoder.layers):
        if i in prompts:
            hidden = torch.cat([hidden[:, :1], prompts[i].expand(batch, -1, -1), hidden[:, 1 + n :]], dim=1)
        hidden = layer(hidden, None)
        states.append(torch.cat([hidden[:, :1], hidden[:, 1 + n :]], dim=1))
    return _project(base, states)


def image_features_per_layer(base, pixel_values, prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Definition, layer by layer: a chosen layer sees its prompts, every other layer none."""
    tower = base.model.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states = [hidden]
    for i, layer in enumerate(tower.encoder.layers):
        if i in prompts:
            n = prompts[i].shape[0]
            out = layer(torch.cat([prompts[i].expand(hidden.shape[0], -1, -1), hidden], dim=1), None)
            hidden = out[:, n:]
        else:
            hidden = layer(hidden, None)
        states.append(hidden)
    return _project(base, states)


def _project(base, states) -> torch.Tensor:
    selected = states[base.config.vision_feature_layer][:, 1:]  # drop CLS ("default" strategy)
    return base.model.multi_modal_projector(selected)


def text_logits_official(base, embeds: torch.Tensor, prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Official scheme: prompts prepended before BOS, overwritten before every layer (all layers)."""
    lm = base.model.language_model
    n = prompts[0].shape[0]
    batch, length = embeds.shape[:2]
    hidden = torch.cat([embeds.new_zeros(batch, n, embeds.shape[-1]), embeds], dim=1)
    positions = torch.arange(n + length)[None]
    rotary = lm.rotary_emb(hidden, positions)
    for j, layer in enumerate(lm.layers):
        hidden = torch.cat([prompts[j].expand(batch, -1, -1), hidden[:, n:]], dim=1)
        hidden = layer(hidden, attention_mask=_causal(n + length), position_embeddings=rotary, position_ids=positions)
    return base.lm_head(lm.norm(hidden)[:, n:])


def text_logits_per_layer(base, embeds: torch.Tensor, prompts: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    """Definition, layer by layer: real tokens at positions n.. everywhere; a chosen layer attends
    to its n prompt positions in front (positions 0..n-1), other layers to real tokens only."""
    lm = base.model.language_model
    batch, length = embeds.shape[:2]
    real_pos = torch.arange(n, n + length)[None]
    full_pos = torch.arange(n + length)[None]
    hidden = embeds
    for j, layer in enumerate(lm.layers):
        if j in prompts:
            seq = torch.cat([prompts[j].expand(batch, -1, -1), hidden], dim=1)
            rotary = lm.rotary_emb(seq, full_pos)
            out = layer(seq, attention_mask=_causal(n + length), position_embeddings=rotary, position_ids=full_pos)
            hidden = out[:, n:]
        else:
            rotary = lm.rotary_emb(hidden, real_pos)
            hidden = layer(hidden, attention_mask=_causal(length), position_embeddings=rotary, position_ids=real_pos)
    return base.lm_head(lm.norm(hidden))


def merge_image(base, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Input embeddings with image placeholders replaced by projected features, in order."""
    embeds = base.model.language_model.embed_tokens(input_ids).clone()
    slots = input_ids == base.config.image_token_id
    embeds[slots] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    return embeds
