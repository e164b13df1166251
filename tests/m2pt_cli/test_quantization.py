"""A quantized frozen base (``model.quantization: 8bit | 4bit``, bitsandbytes on CPU): what is stored
in low precision, what stays trainable, what ``m2pt info`` says it weighs, and the adapter it trains."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from torch import nn

from m2pt_cli import config as recipe_config
from m2pt_cli.errors import UserError
from tests.helpers import adapter, m2pt

pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes: pip install -e '.[dev]'")

MODES = ("8bit", "4bit")
BNB_TYPES = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}


def _recipe(path, mode: str, *extra: str):
    return recipe_config.load(path, (f"model.quantization={mode}", *extra))


def _stored_bytes(module: nn.Module) -> int:
    """Reference: bytes the loaded model really holds (parameters, buffers, and the scales
    bitsandbytes keeps beside each quantized weight)."""
    total, seen = 0, set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:  # 4-bit: one absmax per block
            total += state.absmax.numel() * state.absmax.element_size()
        scales = getattr(tensor, "SCB", None)
        if scales is not None:  # 8-bit: one scale per output row
            total += scales.numel() * scales.element_size()
    return total


@pytest.mark.parametrize("mode", MODES)
def test_frozen_linears_quantized_trained_modules_full_precision(tiny_recipe, mode):
    from m2pt_cli.loading import build

    model, _ = build(_recipe(tiny_recipe, mode))
    kinds = {name: type(m).__name__ for name, m in model.base.named_modules() if isinstance(m, nn.Linear)}
    # reference, by name: the projector (trained) and the output layer stay nn.Linear, all others are bitsandbytes'
    kept = {n for n in kinds if n.startswith("model.multi_modal_projector.") or n == "lm_head"}
    assert kept and {n for n, kind in kinds.items() if kind == "Linear"} == kept
    assert {kind for n, kind in kinds.items() if n not in kept} == {BNB_TYPES[mode]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"vision_prompts", "text_prompts"} | {
        f"base.{n}.{w}" for n in kept - {"lm_head"} for w in ("weight", "bias")
    }
    assert all(p.dtype == torch.float32 and type(p) is nn.Parameter for p in trainable.values())


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_prompts_through_quantized_towers(tiny_recipe, mode):
    """Both prompt sets get gradients through the quantized blocks, after an eval pass without
    gradients too (bitsandbytes' CPU inference repacking would break the next backward)."""
    from m2pt_cli.loading import build
    from tests.cases import images
    from tests.helpers import chat_inputs

    model, processor = build(_recipe(tiny_recipe, mode))
    inputs = chat_inputs(model.backbone, processor, images(1), ["What colour is it?"])
    model.eval()
    with torch.no_grad():
        plain = model(**inputs).logits
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert model.vision_prompts.grad.abs().sum() > 0 and model.text_prompts.grad.abs().sum() > 0
    # the same model in both modes; bitsandbytes' 8-bit layers quantize their inputs too in eval mode
    # (int8 matmul) and dequantize the weight in training mode, so those differ slightly
    assert torch.allclose(out.logits.detach(), plain, atol=1e-5 if mode == "4bit" else 1e-2)


def test_quantized_logits_near_full_precision_and_not_equal(tiny_recipe):
    from m2pt_cli.loading import build
    from tests.cases import images
    from tests.helpers import chat_inputs

    logits = {}
    for mode in ("none", *MODES):
        model, processor = build(_recipe(tiny_recipe, mode))
        model.eval()
        with torch.no_grad():
            logits[mode] = model(**chat_inputs(model.backbone, processor, images(1), ["What colour is it?"])).logits
    scale = logits["none"].abs().max()
    for mode in MODES:
        error = (logits[mode] - logits["none"]).abs().max() / scale
        assert 0 < error < 0.5, (mode, error)  # quantized for real, and still the same network
    assert (logits["8bit"] - logits["none"]).abs().max() < (logits["4bit"] - logits["none"]).abs().max()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["llava", "openclip_vicuna"])
def test_info_weight_memory_matches_the_loaded_model(case, mode, tiny_recipe, tiny_models, tmp_path):
    """``m2pt info``'s estimate, from the model on the meta device, against the bytes a quantized
    load really holds (open_clip's tower is not loaded by transformers and stays full precision)."""
    from m2pt_cli.info import describe
    from m2pt_cli.loading import build

    path = _openclip_recipe(tiny_models[case], tmp_path) if case == "openclip_vicuna" else tiny_recipe
    recipe = _recipe(path, mode)
    estimate = describe(recipe)["weight_bytes"]
    model, _ = build(recipe)
    assert estimate[mode] == _stored_bytes(model.base)
    full, _ = build(_recipe(path, "none"))
    assert estimate["none"] == _stored_bytes(full.base)
    assert estimate["4bit"] < estimate["8bit"] < estimate["none"]


def test_info_prints_each_mode(tiny_recipe):
    out = m2pt("info", tiny_recipe, "model.quantization=4bit").stdout
    line = next(line for line in out.splitlines() if line.startswith("weights"))
    assert "float32" in line and "8bit" in line and "4bit" in line and line.endswith("(model.quantization: 4bit)")


def test_train_on_4bit_base_adapter_loads_on_full_precision(train_recipe, tmp_path):
    """A 4-bit run trains (the projector moves), saves the adapter every run saves, and that adapter
    loads onto the unquantized base: same tensors, same names as an adapter trained in full precision."""
    from m2pt_cli.model_source import load

    run = tmp_path / "q4"
    m2pt("train", train_recipe, "model.quantization=4bit", "train.max_steps=2", "--output-dir", run)
    saved = adapter(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    loaded = load(run / "adapter", overrides=("model.quantization=none",))
    assert loaded.recipe.model.quantization == "none"
    assert not any(type(p).__name__ in ("Params4bit", "Int8Params") for p in loaded.model.parameters())
    state = dict(loaded.model.named_parameters())
    for key, tensor in saved.items():
        assert tensor.dtype == torch.float32
        match = [name for name in state if name.endswith(key) or key.endswith(name)]
        assert match and torch.equal(state[match[0]].detach(), tensor), key
    untrained, _ = load(train_recipe, overrides=("model.quantization=none",))
    before = dict(untrained.named_parameters())["base.model.multi_modal_projector.linear_1.weight"]
    after = state["base.model.multi_modal_projector.linear_1.weight"]
    assert not torch.equal(before, after)


def test_bad_mode_names_allowed(tiny_recipe):
    with pytest.raises(UserError, match=r"model.quantization: .*'3bit'.*none, 8bit, 4bit"):
        _recipe(tiny_recipe, "3bit")


def test_missing_library_and_unsupported_device(monkeypatch):
    from m2pt_cli import quantization

    quantization.require("none", "mps")  # nothing to check
    with pytest.raises(UserError, match=r"model.quantization: 4bit runs on cpu or cuda .*'mps'"):
        quantization.require("4bit", "mps")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec: not installed
    with pytest.raises(UserError, match=r"model.quantization: 8bit needs the bitsandbytes package: pip install"):
        quantization.require("8bit", "cpu")


@pytest.mark.bad_input
def test_old_bitsandbytes_is_refused_in_one_line_before_loading(tiny_recipe, tmp_path, monkeypatch):
    """A bitsandbytes older than the extra's floor (no CPU layers) is named with its version before any
    weights load; the version comes from its metadata (the installed one passes)."""
    from m2pt_cli import quantization

    assert quantization._bitsandbytes_version() is not None
    quantization.require("4bit", "cpu")  # the installed one
    monkeypatch.setattr(quantization, "_bitsandbytes_version", lambda: "0.42.0")
    result = m2pt("train", tiny_recipe, "model.quantization=4bit", "--output-dir", tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "m2pt: error: model.quantization: 4bit needs bitsandbytes >= 0.50 (installed: 0.42.0; older releases "
        "have no CPU layers and fail after loading): pip install -U 'm2pt[quantization]'"
    )
    assert not (tmp_path / "run").exists()


def test_full_finetuning_keeps_the_llm_full_precision(tiny_recipe):
    """``method: full`` trains the LLM: on LLaVA it stays full precision and the rest is quantized."""
    from m2pt_cli.loading import build

    model, _ = build(_recipe(tiny_recipe, "4bit", "method=full"))  # llava: the LLM stays full precision
    llm = model.backbone.language_tower(model.base).stack
    assert not any(type(p).__name__ == "Params4bit" for p in llm.parameters())
    assert any(type(p).__name__ == "Params4bit" for p in model.base.parameters())  # the vision tower


def _openclip_recipe(folder, tmp_path, **extra) -> object:
    raw = {
        "model": {
            "backbone": "openclip_vicuna",
            "name_or_path": str(folder / "llm"),
            "vision_tower": str(folder / "vit"),
            "projector": "mlp2x_gelu",
            "projector_weights": str(folder / "mm_projector.bin"),
            "dtype": "float32",
        },
        "prompts": {"vision": {"length": 2}, "text": {"length": 2}},
        **extra,
    }
    path = tmp_path / "ocv.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_refuses_what_cannot_be_quantized(tiny_models, tiny_recipe, tmp_path):
    """One line, exit 2, nothing written: the whole loaded LLM trained on a quantized base
    (openclip_vicuna, method full), and bitsandbytes missing."""
    from tests.helpers import REPO

    path = _openclip_recipe(tiny_models["openclip_vicuna"], tmp_path, method="full")
    result = m2pt("train", path, "model.quantization=4bit", "--output-dir", tmp_path / "run", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "model.quantization: trainable module 'language_model' would be quantized" in result.stderr
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    env = {"PYTHONPATH": f"{hide}:{REPO}"}
    result = m2pt(
        "train", tiny_recipe, "model.quantization=8bit", "--output-dir", tmp_path / "r2", check=False, env=env
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "m2pt: error: model.quantization: 8bit needs the bitsandbytes package: pip install 'm2pt[quantization]'"
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "r2").exists()


def test_lora_on_a_4bit_base_is_qlora(tiny_recipe):
    """``method=lora`` wraps the 4-bit q/v projections of the LLM; its LoRA weights and the
    full-precision projector get gradients."""
    from m2pt_cli.loading import build
    from tests.cases import images
    from tests.helpers import chat_inputs

    model, processor = build(_recipe(tiny_recipe, "4bit", "method=lora"))
    wrapped = [m for n, m in model.base.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_A")]
    assert wrapped and all(type(m.base_layer).__name__ == "Linear4bit" for m in wrapped)
    model.train()
    inputs = chat_inputs(model.backbone, processor, images(1), ["What colour is it?"])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n or ".multi_modal_projector." in n]
    assert len(grads) > 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
