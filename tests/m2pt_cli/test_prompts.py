"""M²PT on a tiny LLaVA against independent references, and the five invariants of M2PT.md."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import m2pt_cli
from backbones.llava import LlavaBackbone
from tests import reference
from tests.helpers import chat_inputs

BACKBONE = LlavaBackbone()
QUESTIONS = ["What colour is it?", "Is there a cat in this picture? Answer yes or no."]


def images(n: int = 2) -> list[Image.Image]:
    colours = [(200, 30, 30), (20, 90, 220), (10, 200, 40)]
    out = []
    for i in range(n):
        img = Image.new("RGB", (40, 36), colours[i % 3])
        img.paste((255, 255, 255), (5 * i, 4, 5 * i + 12, 20))
        out.append(img)
    return out


def load(recipe, *overrides):
    model, processor = m2pt_cli.load(recipe, overrides=overrides)
    return model.eval(), processor


def inputs(processor, n=2, side="right", answers=None):
    processor.tokenizer.padding_side = side
    return chat_inputs(BACKBONE, processor, images(n), QUESTIONS[:n], answers)


def plain_base(path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def prompts_by_layer(param: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    return {layer: param[k].detach() for k, layer in enumerate(layers)}


@torch.no_grad()
def test_all_layers_match_official_scheme(tiny_recipe, tiny_llava_dir):
    model, processor = load(tiny_recipe)
    cfg = model.m2pt_config
    assert cfg.vision_layers == [0, 1, 2]  # layer 3's output is never read (vision_feature_layer -2)
    assert cfg.text_layers == [0, 1, 2, 3]
    base = plain_base(tiny_llava_dir)
    for i in range(2):  # one sample at a time: the official scheme has no padding story
        x = inputs(processor, 2)
        ids = x["input_ids"][i : i + 1, : int(x["attention_mask"][i].sum())]
        pixels = x["pixel_values"][i : i + 1]
        features = reference.image_features_official(
            base, pixels, prompts_by_layer(model.vision_prompts, cfg.vision_layers)
        )
        embeds = reference.merge_image(base, ids, features)
        expected = reference.text_logits_official(base, embeds, prompts_by_layer(model.text_prompts, cfg.text_layers))
        got = model(input_ids=ids, pixel_values=pixels).logits
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5
        plain = base(input_ids=ids, pixel_values=pixels).logits
        assert (got - plain).abs().max().item() > 1e-3  # the prompts do something


@pytest.mark.parametrize(
    "vision_layers, text_layers",
    [("0-1", "0-1"), ("[2]", "[1, 3]"), ("all", "2-3"), ("[0]", "all")],
)
@torch.no_grad()
def test_layer_subsets_follow_definition(tiny_recipe, tiny_llava_dir, vision_layers, text_layers):
    model, processor = load(tiny_recipe, f"prompts.vision.layers={vision_layers}", f"prompts.text.layers={text_layers}")
    cfg = model.m2pt_config
    base = plain_base(tiny_llava_dir)
    x = inputs(processor, 1)
    features = reference.image_features_per_layer(
        base, x["pixel_values"], prompts_by_layer(model.vision_prompts, cfg.vision_layers)
    )
    embeds = reference.merge_image(base, x["input_ids"], features)
    expected = reference.text_logits_per_layer(
        base, embeds, prompts_by_layer(model.text_prompts, cfg.text_layers), cfg.text_length
    )
    got = model(**x).logits
    assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_vision_prompts_never_reach_the_llm(tiny_recipe):
    model, processor = load(tiny_recipe)
    x = inputs(processor, 2)
    features = model.base.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output
    n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert all(f.shape[0] == n_patches for f in features)


@torch.no_grad()
def test_zero_length_prompts_give_the_base_model(tiny_recipe, tiny_llava_dir):
    model, processor = load(tiny_recipe, "prompts.vision.length=0", "prompts.text.length=0")
    base = plain_base(tiny_llava_dir)
    for i in range(2):
        x = inputs(processor, 2)
        n = int(x["attention_mask"][i].sum())
        one = {"input_ids": x["input_ids"][i : i + 1, :n], "pixel_values": x["pixel_values"][i : i + 1]}
        assert torch.allclose(model(**one).logits, base(**one).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("text_layers", ["all", "1-2"])
@torch.no_grad()
def test_padding_does_not_change_logits(tiny_recipe, side, text_layers):
    model, processor = load(tiny_recipe, f"prompts.text.layers={text_layers}")
    batch = inputs(processor, 2, side=side)
    mask = batch["attention_mask"]
    assert mask[0].sum() < mask[1].sum()  # sample 0 is the short one and gets padded
    batched = model(**batch).logits[0][mask[0].bool()]
    n = int(mask[0].sum())
    ids = batch["input_ids"][0][mask[0].bool()][None]
    alone = model(input_ids=ids, pixel_values=batch["pixel_values"][:1]).logits[0]
    assert alone.shape[0] == n
    assert (batched - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("text_layers", ["all", "0-1"])
def test_generate_same_tokens_with_and_without_kv_cache(tiny_recipe, text_layers):
    model, processor = load(tiny_recipe, f"prompts.text.layers={text_layers}")
    x = inputs(processor, 2, side="left")
    settings = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = model.generate(**x, use_cache=True, return_dict_in_generate=True, **settings)
    uncached = model.generate(**x, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached)
    # prompts enter once, at prefill: the cache holds Nt + prompt tokens + (new tokens - 1)
    expected = model.m2pt_config.text_length + x["input_ids"].shape[1] + 8 - 1
    assert cached.past_key_values.get_seq_length() == expected
    # and greedy decoding is what repeated full forwards choose
    seq = x["input_ids"]
    mask = x["attention_mask"]
    with torch.no_grad():
        for _ in range(3):
            nxt = model(input_ids=seq, attention_mask=mask, pixel_values=x["pixel_values"]).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    assert torch.equal(seq, cached.sequences[:, : seq.shape[1]])


def _train_batch(processor):
    x = inputs(processor, 2, answers=["red", "no"])
    labels = x["input_ids"].clone()
    labels[x["attention_mask"] == 0] = -100
    labels[labels == processor.tokenizer.convert_tokens_to_ids("<image>")] = -100
    return {**x, "labels": labels}


def test_only_trainable_tensors_get_gradients_and_base_is_unchanged(tiny_recipe):
    model, processor = load(tiny_recipe)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    projector = {
        f"base.model.multi_modal_projector.{n}" for n, _ in model.base.model.multi_modal_projector.named_parameters()
    }
    assert trainable == {"vision_prompts", "text_prompts"} | projector
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _train_batch(processor)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
            else:
                assert param.grad is None, name
        optimizer.step()
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    for name, value in before.items():
        assert not torch.equal(dict(model.named_parameters())[name], value), name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_recipe):
    model, processor = load(tiny_recipe)
    model.train()
    batch = _train_batch(processor)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert model.base.model.language_model.layers[0].gradient_checkpointing
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_on_cpu_gives_a_finite_loss(tiny_recipe):
    model, processor = load(tiny_recipe)
    model.train()
    batch = _train_batch(processor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.text_prompts.grad).all() and torch.isfinite(model.vision_prompts.grad).all()


def test_adapter_state_dict_layout(tiny_recipe):
    model, _ = load(tiny_recipe, "prompts.text.layers=1-2", "trainable=[projector, lm_head]")
    state = model.adapter_state_dict()
    assert state["vision_prompts"].shape == (3, 3, 32)
    assert state["text_prompts"].shape == (2, 3, 64)
    assert {k for k in state if k.startswith("projector.")} == {
        "projector.linear_1.weight",
        "projector.linear_1.bias",
        "projector.linear_2.weight",
        "projector.linear_2.bias",
    }
    assert "lm_head.weight" in state
    assert model.m2pt_config.text_layers == [1, 2]
    assert not any(k.startswith(("vision_prompts", "text_prompts")) for k in model.base.state_dict())


def test_remove_prompts_restores_the_base(tiny_recipe, tiny_llava_dir):
    model, processor = load(tiny_recipe)
    x = inputs(processor, 1)
    base = model.remove_prompts()
    with torch.no_grad():
        assert torch.allclose(base(**x).logits, plain_base(tiny_llava_dir)(**x).logits, atol=1e-6)
