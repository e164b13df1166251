"""M²PT against independent references and the five invariants of docs/method.md, on every backbone.

``case`` (tests/conftest.py) runs each test on a tiny LLaVA, InstructBLIP with a Llama and with an
OPT language model, and OpenCLIP + Vicuna.
"""

from __future__ import annotations

import pytest
import torch

import m2pt_cli
from m2pt_cli import hf_conventions as hf
from m2pt_cli.backbones.llava import LlavaBackbone
from tests.cases import QUESTIONS, images
from tests.helpers import chat_inputs, greedy_without_cache

BACKBONE = LlavaBackbone()


def load(recipe, *overrides):
    model, processor = m2pt_cli.load(recipe, overrides=overrides)
    return model.eval(), processor


def inputs(processor, n=2, side="right", answers=None):
    processor.tokenizer.padding_side = side
    return chat_inputs(BACKBONE, processor, images(n), QUESTIONS[:n], answers)


def prompts_by_layer(param: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    return {layer: param[k].detach() for k, layer in enumerate(layers)}


def one_sample(x: dict, i: int) -> dict:
    """Sample ``i`` of a batch without its padding (every tensor input of that sample)."""
    keep = x["attention_mask"][i].bool()
    out = {k: v[i : i + 1] for k, v in x.items()}
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, keep], out["attention_mask"][:, keep]
    if "qformer_attention_mask" in x:
        q = x["qformer_attention_mask"][i].bool()
        out["qformer_input_ids"] = out["qformer_input_ids"][:, q]
        out["qformer_attention_mask"] = out["qformer_attention_mask"][:, q]
    return out


@torch.no_grad()
def test_all_layers_match_official_scheme(case):
    model, processor = load(case.recipe)
    cfg = model.m2pt_config
    assert cfg.text_layers == list(range(cfg.text_total_layers))
    assert cfg.vision_layers == [i for i in range(cfg.vision_total_layers) if i not in cfg.vision_unused_layers]
    base = case.plain_base()
    x = case.inputs(processor, 2)
    for i in range(2):  # one sample at a time: the official scheme has no padding story
        one = one_sample(x, i)
        expected = case.reference(
            base,
            one,
            prompts_by_layer(model.vision_prompts, cfg.vision_layers),
            prompts_by_layer(model.text_prompts, cfg.text_layers),
            cfg.text_length,
            "official",
            case.image_token_id(processor),
        )
        got = model(**one).logits
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5
        plain = base(**one).logits
        assert (got - plain).abs().max().item() > 1e-3  # the prompts do something


@pytest.mark.parametrize(
    "vision_layers, text_layers",
    [("0-1", "0-1"), ("[1]", "[1, 3]"), ("all", "2-3"), ("[0]", "all")],
)
@torch.no_grad()
def test_layer_subsets_follow_definition(case, vision_layers, text_layers):
    model, processor = load(case.recipe, f"prompts.vision.layers={vision_layers}", f"prompts.text.layers={text_layers}")
    cfg = model.m2pt_config
    one = one_sample(case.inputs(processor, 1), 0)
    expected = case.reference(
        case.plain_base(),
        one,
        prompts_by_layer(model.vision_prompts, cfg.vision_layers),
        prompts_by_layer(model.text_prompts, cfg.text_layers),
        cfg.text_length,
        "per_layer",
        case.image_token_id(processor),
    )
    got = model(**one).logits
    assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_vision_prompts_never_reach_the_llm(tiny_recipe):
    model, processor = load(tiny_recipe)
    x = inputs(processor, 2)
    features = model.base.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output
    n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert all(f.shape[0] == n_patches for f in features)


@torch.no_grad()
def test_zero_length_prompts_give_the_base_model(case):
    model, processor = load(case.recipe, "prompts.vision.length=0", "prompts.text.length=0")
    base = case.plain_base()
    x = case.inputs(processor, 2)
    for i in range(2):
        one = one_sample(x, i)
        assert torch.allclose(model(**one).logits, base(**one).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("text_layers", ["all", "1-2"])
@torch.no_grad()
def test_padding_does_not_change_logits(case, side, text_layers):
    model, processor = load(case.recipe, f"prompts.text.layers={text_layers}")
    batch = case.inputs(processor, 2, side=side)
    mask = batch["attention_mask"]
    assert mask[0].sum() < mask[1].sum()  # sample 0 is the short one and gets padded
    batched = model(**batch).logits[0][mask[0].bool()]
    alone = model(**one_sample(batch, 0)).logits[0]
    assert alone.shape[0] == int(mask[0].sum())
    assert (batched - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("text_layers", ["all", "0-1"])
def test_generate_same_tokens_with_and_without_kv_cache(case, text_layers):
    """Cached, batched, left-padded generate() against the reference: greedy decoding as repeated full
    forwards of each sample alone with no KV cache anywhere (generate(use_cache=False) is no reference:
    transformers keeps a cache when generate() gets inputs_embeds, as InstructBLIP and OpenCLIP+Vicuna do)."""
    model, processor = load(case.recipe, f"prompts.text.layers={text_layers}")
    x = case.inputs(processor, 2, side="left")
    eos = processor.tokenizer.eos_token_id
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)  # EOS is never chosen: 8 new tokens
    cached = model.generate(**x, use_cache=True, return_dict_in_generate=True, **settings)
    # prompts enter once, at prefill: the cache holds Nt + prompt tokens + (new tokens - 1)
    expected = model.m2pt_config.text_length + x["input_ids"].shape[1] + 8 - 1
    assert cached.past_key_values.get_seq_length() == expected
    stack = case.backbone.language_tower(model.base).stack
    caches = []
    handle = stack.register_forward_hook(
        lambda module, args, kwargs, output: caches.append((hf.find_cache(kwargs), hf.output_cache(output))),
        with_kwargs=True,
    )
    try:
        references = [greedy_without_cache(model, one_sample(x, i), 8, None, never=(eos,)) for i in range(2)]
    finally:
        handle.remove()
    assert len(caches) == 16 and all(given is None and made is None for given, made in caches)  # no cache anywhere
    for i, new in enumerate(references):
        assert cached.sequences[i, x["input_ids"].shape[1] :].tolist() == new, i


def _train_batch(case, processor):
    x = case.inputs(processor, 2, answers=["red", "no"])
    labels = x["input_ids"].clone()
    labels[x["attention_mask"] == 0] = -100
    labels[labels == case.image_token_id(processor)] = -100
    return {**x, "labels": labels}


def test_only_trainable_tensors_get_gradients_and_base_is_unchanged(case):
    model, processor = load(case.recipe)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(case.trained_prefixes)}
    assert expected and trainable == {"vision_prompts", "text_prompts"} | expected
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _train_batch(case, processor)
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


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(case):
    model, processor = load(case.recipe)
    model.train()
    batch = _train_batch(case, processor)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    assert case.backbone.language_tower(model.base).blocks[0].gradient_checkpointing
    if case.backbone_name == "openclip_vicuna":
        assert model.base.visual.transformer.grad_checkpointing
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_on_cpu_gives_a_finite_loss(case):
    model, processor = load(case.recipe)
    model.train()
    batch = _train_batch(case, processor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.text_prompts.grad).all() and torch.isfinite(model.vision_prompts.grad).all()


def test_bf16_weights_train_and_generate(case):
    """bf16 bases (the recipes' dtype): prompts stay float32 parameters and get finite gradients."""
    model, processor = load(case.recipe, "model.dtype=bfloat16")
    assert next(model.base.parameters()).dtype == torch.bfloat16 and model.text_prompts.dtype == torch.float32
    model.train()
    loss = model(**_train_batch(case, processor)).loss
    assert torch.isfinite(loss)
    loss.backward()
    for prompts in (model.vision_prompts, model.text_prompts):
        assert torch.isfinite(prompts.grad).all() and prompts.grad.abs().sum() > 0
    x = case.inputs(processor, 2, side="left")
    out = model.eval().generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, x["input_ids"].shape[1] + 3)


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


def test_remove_prompts_restores_the_base(case):
    model, processor = load(case.recipe)
    x = case.inputs(processor, 1)
    base = model.remove_prompts()
    with torch.no_grad():
        assert torch.allclose(base(**x).logits, case.plain_base()(**x).logits, atol=1e-6)
