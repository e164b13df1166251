"""The prompt mechanism against transformers' calling conventions: right answers or a loud error.

A decode step is compared with an independent reference, the full forward over the whole sequence
without any cache. Under either spelling of the cache keyword, on the oldest and the newest
supported transformers, a prompted stack gives that reference; where the mechanism cannot see the
cache it raises ``ConventionError``; it never answers wrongly.
"""

from __future__ import annotations

import pytest
import torch

import m2pt_cli
from m2pt_cli import hf_conventions as hf
from m2pt_cli.hf_conventions import ConventionError

# transformers warns about the deprecated spelling, which these tests use on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*(past_key_values|cache).*:FutureWarning")


def load(recipe, *overrides):
    model, processor = m2pt_cli.load(recipe, overrides=overrides)
    return model.eval(), processor


def stack_inputs(case, model, lengths=(6, 9)):
    """The prompted decoder stack and a left-padded batch of token embeddings for it."""
    tower = case.backbone.language_tower(model.base)
    vocab = tower.embed.num_embeddings
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    return tower.stack, tower.embed, ids, mask


def prefill_then_step(case, model, keyword: str):
    """The last hidden state of one cached decode step, passing the cache as ``keyword``, and the
    reference: the same position from a full forward over the whole sequence without any cache."""
    stack, embed, ids, mask = stack_inputs(case, model)
    nxt = torch.randint(0, embed.num_embeddings, (ids.shape[0], 1), generator=torch.Generator().manual_seed(1))
    longer = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    with torch.no_grad():
        cache = hf.output_cache(stack(inputs_embeds=embed(ids), attention_mask=mask, use_cache=True))
        assert cache is not None and hf.cached_length(cache) > 0
        step = stack(inputs_embeds=embed(nxt), attention_mask=longer, use_cache=True, **{keyword: cache})
        full = stack(inputs_embeds=embed(torch.cat([ids, nxt], dim=1)), attention_mask=longer, use_cache=False)
    return step.last_hidden_state[:, -1], full.last_hidden_state[:, -1]


@pytest.mark.parametrize("keyword", hf.CACHE_KEYWORDS)
@pytest.mark.parametrize("layers", ["all", "0-1"])
def test_a_decode_step_matches_the_full_forward_under_either_cache_keyword(case, keyword, layers):
    model, _ = load(case.recipe, f"prompts.text.layers={layers}")
    step, reference = prefill_then_step(case, model, keyword)
    assert (step - reference).abs().max().item() <= 1e-4


def test_an_unseen_cache_is_an_error_not_a_wrong_answer(case, monkeypatch):
    """transformers 5.24's rename, replayed: the hook stops finding the cache; generation must stop."""
    model, processor = load(case.recipe)
    x = case.inputs(processor, 2, side="left")
    monkeypatch.setattr(hf, "route_cache", lambda stack, kwargs: None)
    with pytest.raises(ConventionError, match=r"attention mask over \d+ tokens"):
        model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)


def test_an_unseen_cache_without_a_mask_is_caught_after_the_step(case, monkeypatch):
    model, _ = load(case.recipe)
    stack, embed, ids, _ = stack_inputs(case, model, lengths=(5,))
    embeds = embed(ids)
    with torch.no_grad():
        cache = hf.output_cache(stack(inputs_embeds=embeds, use_cache=True))
        monkeypatch.setattr(hf, "route_cache", lambda stack, kwargs: None)
        keyword = hf._declared_cache_keyword(type(stack))
        with pytest.raises(ConventionError, match="did not see the cache"):
            stack(inputs_embeds=embeds[:, :1], use_cache=True, **{keyword: cache})


def test_a_cache_for_a_stack_without_a_cache_keyword_is_refused():
    class NoCacheStack(torch.nn.Module):
        def forward(self, inputs_embeds=None, attention_mask=None):
            return inputs_embeds

    with pytest.raises(ConventionError, match="NoCacheStack.forward takes none of the cache keywords"):
        hf.route_cache(NoCacheStack(), {"cache": FakeCache(3)})


class FakeCache:
    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self) -> int:
        return self.length


def test_find_cache_reads_both_spellings_and_refuses_strays():
    cache = FakeCache(4)
    assert hf.find_cache({"cache": cache}) is cache
    assert hf.find_cache({"past_key_values": cache}) is cache
    assert hf.find_cache({"cache": cache, "past_key_values": cache}) is cache
    assert hf.find_cache({"past_key_values": None, "attention_mask": torch.ones(1, 2)}) is None
    with pytest.raises(ConventionError, match="two different KV caches"):
        hf.find_cache({"cache": cache, "past_key_values": FakeCache(4)})
    with pytest.raises(ConventionError, match="unknown keyword 'kv_cache'"):
        hf.find_cache({"kv_cache": cache})


def test_check_step_accepts_consistent_steps_and_names_the_inconsistent_one():
    hf.check_step(past=0, step=7, mask_length=7, n_prompts=3)  # prefill
    hf.check_step(past=10, step=1, mask_length=8, n_prompts=3)  # 3 prompts + 7 real cached, 1 new
    hf.check_step(past=10, step=1, mask_length=None, n_prompts=3)
    with pytest.raises(ConventionError, match="over 8 tokens, expected 1") as exc:
        hf.check_step(past=0, step=1, mask_length=8, n_prompts=3)  # a decode step that saw no cache
    assert hf.transformers_version() in str(exc.value)
    with pytest.raises(ConventionError, match="fewer than the 3 prompt positions"):
        hf.check_step(past=2, step=1, mask_length=None, n_prompts=3)
