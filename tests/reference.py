"""Independent re-implementations of M²PT, written straight from docs/method.md.

They call the base model's own blocks one by one, so they share its weights but none of m2pt's
hook machinery. Encoders: ``run(block, hidden)`` calls one block. Decoders: Llama-family stacks
(rotary positions) and OPT stacks (learned absolute positions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Run = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()[None, None]


# ---------------------------------------------------------------------------- encoders


def encoder_official(blocks, run: Run, hidden: torch.Tensor, prompts: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Official scheme: prompts inserted after CLS at the input, overwritten before every chosen layer.

    Returns the hidden states without prompts: ``states[0]`` the input, ``states[k]`` block k-1's
    output. Only valid when every block up to the last one read holds prompts.
    """
    n = next(iter(prompts.values())).shape[0]
    batch = hidden.shape[0]
    hidden = torch.cat([hidden[:, :1], hidden.new_zeros(batch, n, hidden.shape[-1]), hidden[:, 1:]], dim=1)
    states = [torch.cat([hidden[:, :1], hidden[:, 1 + n :]], dim=1)]
    for i, block in enumerate(blocks):
        if i in prompts:
            hidden = torch.cat([hidden[:, :1], prompts[i].expand(batch, -1, -1), hidden[:, 1 + n :]], dim=1)
        hidden = run(block, hidden)
        states.append(torch.cat([hidden[:, :1], hidden[:, 1 + n :]], dim=1))
    return states


def encoder_per_layer(blocks, run: Run, hidden: torch.Tensor, prompts: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Definition, layer by layer: a chosen block sees its prompts (here in front), every other none."""
    states = [hidden]
    for i, block in enumerate(blocks):
        if i in prompts:
            n = prompts[i].shape[0]
            hidden = run(block, torch.cat([prompts[i].expand(hidden.shape[0], -1, -1), hidden], dim=1))[:, n:]
        else:
            hidden = run(block, hidden)
        states.append(hidden)
    return states


def merge_image(embed, input_ids: torch.Tensor, features: torch.Tensor, image_id: int) -> torch.Tensor:
    """Input embeddings with image placeholders replaced by projected features, in order."""
    slots = input_ids == image_id
    embeds = embed(input_ids.masked_fill(slots, 0)).clone()
    embeds[slots] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    return embeds


# ---------------------------------------------------------------------------- Llama-family decoders


def llama_official(stack, head, embeds: torch.Tensor, prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Official scheme: prompts prepended before BOS, overwritten before every layer (all layers)."""
    n = prompts[0].shape[0]
    batch, length = embeds.shape[:2]
    hidden = torch.cat([embeds.new_zeros(batch, n, embeds.shape[-1]), embeds], dim=1)
    positions = torch.arange(n + length)[None]
    rotary = stack.rotary_emb(hidden, positions)
    for j, layer in enumerate(stack.layers):
        hidden = torch.cat([prompts[j].expand(batch, -1, -1), hidden[:, n:]], dim=1)
        hidden = layer(hidden, attention_mask=_causal(n + length), position_embeddings=rotary, position_ids=positions)
    return head(stack.norm(hidden)[:, n:])


def llama_per_layer(
    stack, head, embeds: torch.Tensor, prompts: dict[int, torch.Tensor], n: int, offset: int = 0
) -> torch.Tensor:
    """Definition, layer by layer: real tokens at positions n.. everywhere; a chosen layer attends
    to its n prompt positions in front (positions 0..n-1), other layers to real tokens only.
    ``offset``: a caller's positions start there, so real tokens sit at n + offset.."""
    batch, length = embeds.shape[:2]
    real_pos = torch.arange(n + offset, n + offset + length)[None]
    full_pos = torch.cat([torch.arange(n), real_pos[0]])[None]
    hidden = embeds
    for j, layer in enumerate(stack.layers):
        if j in prompts:
            seq = torch.cat([prompts[j].expand(batch, -1, -1), hidden], dim=1)
            rotary = stack.rotary_emb(seq, full_pos)
            out = layer(seq, attention_mask=_causal(n + length), position_embeddings=rotary, position_ids=full_pos)
            hidden = out[:, n:]
        else:
            rotary = stack.rotary_emb(hidden, real_pos)
            hidden = layer(hidden, attention_mask=_causal(length), position_embeddings=rotary, position_ids=real_pos)
    return head(stack.norm(hidden))


# ---------------------------------------------------------------------------- OPT decoders


def _opt_finish(decoder, head, hidden: torch.Tensor) -> torch.Tensor:
    if decoder.final_layer_norm is not None:
        hidden = decoder.final_layer_norm(hidden)
    if decoder.project_out is not None:
        hidden = decoder.project_out(hidden)
    return head(hidden)


def _opt_positions(decoder, positions: torch.Tensor) -> torch.Tensor:
    return decoder.embed_positions(torch.ones_like(positions), 0, position_ids=positions)


def opt_official(decoder, head, embeds: torch.Tensor, prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Official scheme on OPT: n positions before BOS (learned position embeddings 0..n+T-1 added at
    the input), their hidden states overwritten by the prompts before every layer."""
    n = prompts[0].shape[0]
    batch, length = embeds.shape[:2]
    positions = torch.arange(n + length)[None]
    hidden = torch.cat([embeds.new_zeros(batch, n, embeds.shape[-1]), embeds], dim=1)
    hidden = hidden + _opt_positions(decoder, positions)
    for j, layer in enumerate(decoder.layers):
        hidden = torch.cat([prompts[j].expand(batch, -1, -1), hidden[:, n:]], dim=1)
        hidden = layer(hidden, attention_mask=_causal(n + length), position_ids=positions)
    return _opt_finish(decoder, head, hidden)[:, n:]


def opt_per_layer(
    decoder, head, embeds: torch.Tensor, prompts: dict[int, torch.Tensor], n: int, offset: int = 0
) -> torch.Tensor:
    """Definition on OPT: real tokens carry position embeddings n + offset..; chosen layers see prompts in front."""
    batch, length = embeds.shape[:2]
    hidden = embeds + _opt_positions(decoder, torch.arange(n + offset, n + offset + length)[None])
    for j, layer in enumerate(decoder.layers):
        if j in prompts:
            seq = torch.cat([prompts[j].expand(batch, -1, -1), hidden], dim=1)
            hidden = layer(seq, attention_mask=_causal(n + length))[:, n:]
        else:
            hidden = layer(hidden, attention_mask=_causal(length))
    return _opt_finish(decoder, head, hidden)
