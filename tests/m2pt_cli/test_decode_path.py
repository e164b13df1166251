"""Decode steps with prompts take the same path through the decoder stack as without them.

transformers' ``generate`` drops an all-ones attention mask, so an unpadded prompt-free stack runs
maskless (sdpa's ``is_causal``, no 2D mask to check each step). The prompt hooks keep it that way:
no mask in means no mask handed on, in the prefill and in every decode step, with positions that
simply follow the cache (prompts at ``0..Nt-1``). The tokens stay those of cache-free decoding.
"""

from __future__ import annotations

import pytest
import torch

import m2pt_cli
from tests.helpers import chat_inputs, greedy_without_cache

NEW = 5


def _generate_recording(model, inputs) -> tuple[list[int], list[dict]]:
    """Greedy tokens of ``inputs`` and, per stack forward, the mask and positions the stack itself got."""
    stack = model.backbone.language_tower(model.base).stack
    calls: list[dict] = []

    def record(module, args, kwargs):  # registered after the prompt hooks: sees what the stack gets
        mask = kwargs.get("attention_mask")
        calls.append({"mask": None if mask is None else tuple(mask.shape), "positions": kwargs["position_ids"]})

    handle = stack.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True)
    finally:
        handle.remove()
    return out[0, inputs["input_ids"].shape[1] :].tolist(), calls


def _one_unpadded_sample(tiny_recipe, *overrides):
    from PIL import Image

    model, processor = m2pt_cli.load(tiny_recipe, overrides=overrides)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    inputs = chat_inputs(model.backbone, processor, [image], ["What is it?"])
    assert bool(inputs["attention_mask"].all())  # unpadded: generate drops the mask
    return model.eval(), inputs


@pytest.mark.parametrize("text_layers", ["all", "0-1"])
@torch.no_grad()
def test_unpadded_decode_hands_the_stack_no_mask_and_cache_positions(tiny_recipe, text_layers):
    model, inputs = _one_unpadded_sample(tiny_recipe, f"prompts.text.layers={text_layers}")
    n, length = model.m2pt_config.text_length, inputs["input_ids"].shape[1]
    assert n > 0
    tokens, calls = _generate_recording(model, inputs)
    assert len(calls) == NEW
    assert [c["mask"] for c in calls] == [None] * NEW  # before the fix: a (1, cached + 1) mask each step
    assert calls[0]["positions"].tolist() == [list(range(n + length))]
    for k, call in enumerate(calls[1:]):  # the cache holds Nt + length + k positions
        assert call["positions"].tolist() == [[n + length + k]]
    plain, _ = _one_unpadded_sample(tiny_recipe, "prompts.text.length=0", "prompts.vision.length=0")
    _, plain_calls = _generate_recording(plain, inputs)
    assert [c["mask"] for c in plain_calls] == [None] * NEW  # the path the prompt-free stack takes
    eos = model.base.generation_config.eos_token_id
    never = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    reference = greedy_without_cache(model, dict(inputs), NEW, None, never=never)
    assert tokens == reference


@torch.no_grad()
def test_a_padded_decode_still_gets_its_mask(tiny_recipe):
    """Padding must reach attention: a mask in is a mask (prompt columns in front) handed on."""
    model, inputs = _one_unpadded_sample(tiny_recipe)
    n, length = model.m2pt_config.text_length, inputs["input_ids"].shape[1]
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"].new_zeros(1, 2), inputs["input_ids"]], dim=1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"].new_zeros(1, 2), inputs["attention_mask"]], dim=1)
    tokens, calls = _generate_recording(model, padded)
    assert [c["mask"] for c in calls] == [(1, n + 2 + length + k) for k in range(NEW)]
    assert calls[0]["positions"][0, n + 2 :].tolist() == list(range(n, n + length))
    unpadded, _ = _generate_recording(model, inputs)
    assert tokens == unpadded
