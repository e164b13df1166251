"""The M²PT prompt mechanism: deep prompts in a bidirectional encoder and in a causal decoder.

Torch only; it never knows which model it wraps. Everything is done with forward hooks, so the
base model's modules, weights and state dict stay untouched, and removing the hooks restores it.

Encoder (bidirectional): before each chosen block, ``Nv`` prompt vectors join the sequence (no
position embedding); after the block their outputs are dropped, so the change stays local.

Decoder (causal, Hugging Face decoder stack): on the first forward of a sequence (no KV cache yet)
``Nt`` positions are put in front of the sequence; before each chosen block their hidden states are
replaced by that block's prompts, so the block's own input norm, key/value projections and rotary
embedding (positions ``0..Nt-1``) turn them into keys and values. Real tokens sit at positions
``Nt..`` whatever the padding, because position ids are derived from the attention mask; a
caller's ``position_ids`` are honoured, shifted by ``Nt`` (packed sequences, whose positions restart
within a row, are refused). With ``Nt = 0`` the stack gets the call exactly as made. Blocks
that are not chosen have the prompt columns masked out. After the stack the prompt positions are
dropped, so logits align one-to-one with ``input_ids``. Later decode steps find the prompt keys and
values in the KV cache and add nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from m2pt_cli import hf_conventions as hf

# Name of the keyword argument that carries per-forward prompt state from the decoder stack to its
# blocks (Hugging Face decoder stacks pass unknown keyword arguments on to every block).
STEP_KWARG = "m2pt_step"


def init_prompts(layers: int, length: int, width: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """Return a float32 tensor of prompts shaped (layers, length, width).

    Args:
        init: ``xavier`` (uniform, per layer, fan = length + width), ``normal`` (std 0.02) or ``zeros``.
    """
    out = torch.zeros(layers, length, width)
    if out.numel() == 0 or init == "zeros":
        return out
    if init == "xavier":
        bound = math.sqrt(6.0 / (length + width))
        return out.uniform_(-bound, bound, generator=generator)
    if init == "normal":
        return out.normal_(0.0, 0.02, generator=generator)
    raise ValueError(f"unknown prompt init {init!r}; allowed: xavier, normal, zeros")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def attach_encoder_prompts(
    blocks: Sequence[nn.Module], layers: Sequence[int], prompts: nn.Parameter
) -> list[RemovableHandle]:
    """Add deep prompts to the chosen blocks of a bidirectional encoder.

    Args:
        blocks: the encoder blocks; each takes hidden states (B, T, D) as its first argument.
        layers: indices of the chosen blocks, ascending; ``prompts[k]`` belongs to ``layers[k]``.
        prompts: (len(layers), Nv, D).
    Returns:
        the hook handles (``handle.remove()`` detaches).
    """
    handles: list[RemovableHandle] = []
    if prompts.shape[1] == 0:
        return handles
    n_prompts = prompts.shape[1]
    for slot, index in enumerate(layers):

        def add_prompts(module, args, kwargs, slot=slot):
            hidden = args[0]  # (B, T, D)
            tokens = prompts[slot].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            return (torch.cat([hidden, tokens], dim=1), *args[1:]), kwargs

        def drop_prompts(module, args, kwargs, output):
            return _replace_first(output, _first(output)[:, :-n_prompts])

        block = blocks[index]
        handles.append(block.register_forward_pre_hook(add_prompts, with_kwargs=True))
        # prepend: output-capturing hooks (hidden_states) must see the sequence without prompts.
        handles.append(block.register_forward_hook(drop_prompts, with_kwargs=True, prepend=True))
    return handles


@dataclass
class DecoderStep:
    """What one forward of the decoder stack tells its blocks.

    Attributes:
        prompts: (layers, Nt, D) in the activation dtype when the prompt positions are in this
            forward's sequence (the first forward of a sequence), else None.
        allowed: (Q, KV) bool, where blocks without prompts may attend: causal and not a prompt
            column (a prompt row keeps its own column so no row is empty). None if every block has
            prompts.
        past: positions already in the KV cache before this forward (prompts included).
        tokens: positions this forward adds (prompts included on the first forward).
    """

    prompts: torch.Tensor | None
    allowed: torch.Tensor | None
    past: int = 0
    tokens: int = 0


def attach_decoder_prompts(
    stack: nn.Module,
    blocks: Sequence[nn.Module],
    layers: Sequence[int],
    prompts: nn.Parameter,
    embed: Callable[[torch.Tensor], torch.Tensor],
) -> list[RemovableHandle]:
    """Add deep prompts to a Hugging Face causal decoder stack.

    Args:
        stack: the decoder stack (e.g. ``LlamaModel``), called as ``hf_conventions`` describes.
        blocks: the stack's decoder blocks, in order.
        layers: indices of the chosen blocks, ascending; ``prompts[k]`` belongs to ``layers[k]``.
        prompts: (len(layers), Nt, D).
        embed: maps input ids to input embeddings (used when the stack gets ``input_ids``).
    Returns:
        the hook handles.

    Blocks that are not chosen need a tensor attention mask (sdpa or eager attention). A call that
    breaks an assumption of ``hf_conventions`` raises ``ConventionError`` rather than give wrong outputs.
    """
    n_prompts = prompts.shape[1] if len(layers) else 0
    chosen = set(layers)
    unprompted = [i for i in range(len(blocks)) if i not in chosen] if n_prompts else []

    def prepare(module, args, kwargs):
        if args:
            raise TypeError("m2pt: call the decoder stack with keyword arguments")
        past = hf.cached_length(hf.route_cache(module, kwargs))
        mask = kwargs.get("attention_mask")
        if not n_prompts:  # nothing to add: the call reaches the stack as the caller made it
            tokens = kwargs.get("inputs_embeds")
            length = (tokens if tokens is not None else kwargs["input_ids"]).shape[1]
            if mask is not None and mask.dim() == 2:
                hf.check_step(past, length, mask.shape[1], 0)
            kwargs[STEP_KWARG] = DecoderStep(prompts=None, allowed=None, past=past, tokens=length)
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = embed(kwargs["input_ids"])
        batch, length = embeds.shape[:2]
        first = past == 0
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"m2pt needs a 2D attention mask (batch, tokens); got a {mask.dim()}D mask")
        hf.check_step(past, length, None if mask is None else mask.shape[1], n_prompts)
        given = kwargs.get("position_ids")
        if given is not None:
            given = _caller_positions(given, None if mask is None else mask[:, -length:], n_prompts, batch, length)
        step_tokens = length + (n_prompts if first else 0)
        if first:
            embeds = torch.cat([embeds.new_zeros(batch, n_prompts, embeds.shape[-1]), embeds], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, n_prompts), mask], dim=1)
        if given is None:
            positions = _positions(mask, past, step_tokens, batch, embeds.device)
        elif first:  # the caller's positions shifted by Nt, behind the prompts' 0..Nt-1
            front = torch.arange(n_prompts, dtype=given.dtype, device=given.device).expand(batch, -1)
            positions = torch.cat([front, given], dim=1)
        else:
            positions = given
        # No mask stays no mask (prompts are never padding): the stack then takes the same maskless
        # path as without prompts (sdpa's is_causal), also in every decode step.
        kwargs.update(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        kwargs.pop("input_ids", None)
        allowed = None
        if unprompted:
            kv = torch.arange(past + step_tokens, device=embeds.device)
            query = kv[-step_tokens:, None]  # absolute positions of this step's tokens
            allowed = (kv[None, :] <= query) & ((kv[None, :] >= n_prompts) | (kv[None, :] == query))
        cast = prompts.to(embeds.dtype) if first else None
        kwargs[STEP_KWARG] = DecoderStep(prompts=cast, allowed=allowed, past=past, tokens=step_tokens)
        return args, kwargs

    def finish(module, args, kwargs, output):
        step = kwargs.get(STEP_KWARG)
        if step is None:
            return output
        hf.check_cache_grew(output, step.past, step.tokens)
        if step.prompts is None:
            return output
        output.last_hidden_state = output.last_hidden_state[:, n_prompts:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n_prompts:] for h in output.hidden_states)
        return output

    handles = [
        stack.register_forward_pre_hook(prepare, with_kwargs=True),
        stack.register_forward_hook(finish, with_kwargs=True, prepend=True),
    ]
    if not n_prompts:
        for block in blocks:  # the step record is for the stack's own checks; blocks never see it

            def discard(module, args, kwargs):
                kwargs.pop(STEP_KWARG, None)
                return args, kwargs

            handles.append(block.register_forward_pre_hook(discard, with_kwargs=True))
        return handles

    for slot, index in enumerate(layers):

        def overwrite(module, args, kwargs, slot=slot):
            step: DecoderStep = kwargs.pop(STEP_KWARG)
            if step.prompts is None:
                return args, kwargs
            hidden = args[0]  # (B, Nt + T, D)
            tokens = step.prompts[slot].unsqueeze(0).expand(hidden.shape[0], -1, -1)
            return (torch.cat([tokens, hidden[:, n_prompts:]], dim=1), *args[1:]), kwargs

        handles.append(blocks[index].register_forward_pre_hook(overwrite, with_kwargs=True))

    for index in unprompted:

        def hide_prompts(module, args, kwargs):
            step: DecoderStep = kwargs.pop(STEP_KWARG)
            kwargs["attention_mask"] = _restrict_mask(kwargs.get("attention_mask"), step.allowed)
            return args, kwargs

        handles.append(blocks[index].register_forward_pre_hook(hide_prompts, with_kwargs=True))
    return handles


def _positions(mask: torch.Tensor | None, past: int, step_tokens: int, batch: int, device) -> torch.Tensor:
    """Position ids of this step's positions (batch, step_tokens): prompts at 0..Nt-1, real tokens from
    Nt on, padding or not (from the 2D mask with the prompt columns in front; without a mask every
    position is real, so they simply follow the cache)."""
    if mask is None:
        return torch.arange(past, past + step_tokens, device=device).expand(batch, -1)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -step_tokens:]


def _caller_positions(
    given: torch.Tensor, mask: torch.Tensor | None, n_prompts: int, batch: int, length: int
) -> torch.Tensor:
    """A caller's ``position_ids`` for this step's real tokens, shifted by ``n_prompts`` (batch, tokens).

    Args:
        given: the caller's position ids, (batch, tokens) or (1, tokens).
        mask: this step's columns of the 2D padding mask (batch, tokens), or None (no padding).
    Raises:
        ValueError: another shape, or positions that restart within a row (packed sequences: each
            sequence would need its own prompts in front, which one row cannot give).
    """
    if given.dim() != 2 or given.shape[1] != length or given.shape[0] not in (1, batch):
        raise ValueError(f"m2pt: position_ids must be (batch, tokens) = ({batch}, {length}); got {tuple(given.shape)}")
    given = given.long().expand(batch, length)
    if length > 1:  # every real token's position must exceed those of the real tokens before it
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=given.device)
        real, low = mask.bool(), torch.iinfo(torch.long).min
        highest = given.masked_fill(~real, low).cummax(dim=1).values
        before = torch.cat([highest.new_full((batch, 1), low), highest[:, :-1]], dim=1)
        if bool((real & (given <= before)).any()):
            raise ValueError(
                "m2pt: position_ids restart or fall within a row (packed sequences?); every sequence needs its "
                "own prompts in front, so pass one sequence per row, padded, with its attention_mask"
            )
    return given + n_prompts


def _restrict_mask(mask, allowed: torch.Tensor):
    """Intersect a model-built attention mask with ``allowed`` (Q, KV)."""
    if mask is None:  # sdpa would have used is_causal; ``allowed`` is causal already
        return allowed[None, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(
            "prompts on a subset of decoder layers need sdpa or eager attention (set model.attn_implementation)"
        )
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
