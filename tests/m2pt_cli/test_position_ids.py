"""A caller's ``position_ids`` reach the prompted decoder stack: honoured, shifted by ``Nt``, or refused.

Real tokens sit at ``Nt + p`` for the caller's position ``p`` (prompts keep ``0..Nt-1``); without
``position_ids`` they sit at ``Nt..`` as the attention mask implies. Positions that restart within a
row (packed sequences) are refused: each sequence would need its own prompts. With both prompt
lengths 0 the stack gets the call exactly as made. The reference is tests/reference.py's per-layer
definition, run on the base model's own blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import m2pt_cli
from tests import reference

LENGTH = 7


def load(recipe, *overrides):
    model, processor = m2pt_cli.load(recipe, overrides=overrides)
    return model.eval(), processor


def setup(case, *overrides):
    """The prompted stack, the plain base's stack (no hooks), prompts by layer, Nt and random embeddings."""
    model, _ = load(case.recipe, *overrides)
    tower = case.backbone.language_tower(model.base)
    plain = case.backbone.language_tower(case.plain_base()).stack
    cfg = model.m2pt_config
    prompts = {layer: model.text_prompts[k].detach() for k, layer in enumerate(cfg.text_layers)}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tower.embed.num_embeddings, (2, LENGTH), generator=generator)
    return tower.stack, plain, prompts, cfg.text_length, tower.embed(ids).detach()


def expected(case, plain, embeds, prompts, n, offset):
    """The definition's last hidden state for one unpadded row whose caller positions start at ``offset``."""
    decoder = reference.opt_per_layer if case.name == "instructblip_opt" else reference.llama_per_layer
    return decoder(plain, nn.Identity(), embeds, prompts, n, offset=offset)


def change(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("layers", ["all", "1-2"])
@torch.no_grad()
def test_caller_positions_are_honoured_shifted_by_nt(case, layers):
    stack, plain, prompts, n, embeds = setup(case, f"prompts.text.layers={layers}")
    one = embeds[:1]
    implied = stack(inputs_embeds=one).last_hidden_state
    outputs = {}
    for offset in (0, 5):
        positions = torch.arange(offset, offset + LENGTH)[None]
        outputs[offset] = stack(inputs_embeds=one, position_ids=positions).last_hidden_state
        error = change(outputs[offset], expected(case, plain, one, prompts, n, offset))
        assert error <= 1e-5, f"positions from {offset}: off by {error:.3g}"
    assert change(outputs[0], implied) <= 1e-6  # the positions the mask implies are the same positions
    assert change(outputs[5], outputs[0]) > 1e-3  # and the caller's positions do count


@torch.no_grad()
def test_padded_rows_with_their_own_positions_match_each_row_alone(case):
    stack, plain, prompts, n, embeds = setup(case)
    lengths, offsets = (4, LENGTH), (3, 0)
    mask = torch.zeros(2, LENGTH, dtype=torch.long)
    positions = torch.zeros(2, LENGTH, dtype=torch.long)  # padding keeps position 0, as generate() gives it
    for row, (length, offset) in enumerate(zip(lengths, offsets, strict=True)):
        mask[row, -length:] = 1
        positions[row, -length:] = torch.arange(offset, offset + length)
    batched = stack(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    for row, (length, offset) in enumerate(zip(lengths, offsets, strict=True)):
        alone = expected(case, plain, embeds[row : row + 1, -length:], prompts, n, offset)
        error = change(batched[row : row + 1, -length:], alone)
        assert error <= 1e-5, f"row {row}: off by {error:.3g}"


@torch.no_grad()
def test_packed_sequences_are_refused(case):
    stack, _, _, _, embeds = setup(case)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with pytest.raises(ValueError, match=r"position_ids restart or fall within a row \(packed sequences"):
        stack(inputs_embeds=embeds[:1], position_ids=packed)
    with pytest.raises(ValueError, match=r"position_ids must be \(batch, tokens\) = \(2, 7\); got \(2, 3\)"):
        stack(inputs_embeds=embeds, position_ids=torch.zeros(2, 3, dtype=torch.long))


@torch.no_grad()
def test_zero_length_prompts_pass_the_call_through(case):
    """Packed sequences, no mask: with nothing to add, the prompted stack is the base stack, whatever it does."""
    stack, plain, _, _, embeds = setup(case, "prompts.vision.length=0", "prompts.text.length=0")
    for positions in (torch.tensor([[0, 1, 2, 3, 0, 1, 2]]), torch.arange(4, 4 + LENGTH)[None]):
        got = stack(inputs_embeds=embeds[:1], position_ids=positions).last_hidden_state
        assert torch.equal(got, plain(inputs_embeds=embeds[:1], position_ids=positions).last_hidden_state)
