"""Kernel and precision parity: the same M²PT model and padded batch under each attention kernel and
dtype the machine offers, against float32 eager attention on CPU (the path the mechanism tests check
against their reference implementations).

Each variant is compared on the loss, the logits of the answer tokens, the gradients of every trained
tensor (the prompts among them) and eight greedy tokens decoded with the KV cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from m2pt_cli import config as recipe_config
from m2pt_cli.benchmark.methods import Shapes, synthetic_batch

REFERENCE = ("cpu", "float32", "eager")

GREEDY_TOKENS = 8

AUTOCAST = "float32+autocast-bf16"  # float32 weights under bf16 autocast, as the Trainer's bf16 runs them

# (loss relative error, logits' RMS error over the reference logits' spread, least gradient cosine)
TOLERANCE = {"float32": (1e-4, 1e-3, 0.9999), "bfloat16": (3e-2, 0.1, 0.99), AUTOCAST: (3e-2, 0.1, 0.99)}


def variants(device: str) -> list[tuple[str, str, str]]:
    """(device, dtype, attention kernel) for each variant this machine can run besides the reference."""
    if not device.startswith("cuda"):
        return [
            ("cpu", "float32", "sdpa"),
            ("cpu", "bfloat16", "eager"),
            ("cpu", "bfloat16", "sdpa"),
            ("cpu", AUTOCAST, "sdpa"),
        ]
    found = [(device, dtype, kernel) for dtype in ("float32", "bfloat16", AUTOCAST) for kernel in ("eager", "sdpa")]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append((device, "bfloat16", "flash_attention_2"))
    return found


def padded_batch(model, processor, shapes: Shapes, device: str) -> dict[str, torch.Tensor]:
    """The bench's synthetic batch with its rows right-padded as the training collator pads them: row i
    loses its last ``i * seq_len / (2 * batch)`` tokens (attention mask 0, label -100)."""
    batch = synthetic_batch(model, processor, shapes, device)
    pad = processor.tokenizer.pad_token_id or 0
    for row in range(1, shapes.batch_size):
        cut = shapes.seq_len - row * shapes.seq_len // (2 * shapes.batch_size)
        batch["input_ids"][row, cut:] = pad
        batch["attention_mask"][row, cut:] = 0
        batch["labels"][row, cut:] = -100
    return batch


def _outputs(model, batch: dict[str, torch.Tensor], autocast: bool = False) -> dict[str, Any]:
    """Loss, answer-token logits, trained tensors' gradients (float32, on CPU) and greedy tokens."""
    device_type = batch["input_ids"].device.type
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        result = model(**batch)
    result.loss.backward()
    answer = batch["labels"] != -100
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    inputs = {k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        tokens = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False, use_cache=True)
    return {
        "loss": result.loss.detach().float().cpu().item(),
        "logits": result.logits.detach().float().cpu()[answer.cpu()],
        "grads": grads,
        "tokens": tokens[0, -GREEDY_TOKENS:].cpu().tolist(),
    }


def _compare(reference: dict[str, Any], other: dict[str, Any], dtype: str) -> dict[str, Any]:
    loss_tol, logits_tol, cosine_tol = TOLERANCE[dtype]
    loss_error = abs(other["loss"] - reference["loss"]) / abs(reference["loss"])
    spread = reference["logits"].std().item()
    logits_error = (other["logits"] - reference["logits"]).pow(2).mean().sqrt().item() / spread
    cosines = {
        name: torch.nn.functional.cosine_similarity(grad.flatten(), other["grads"][name].flatten(), dim=0).item()
        for name, grad in reference["grads"].items()
    }
    missing = sorted(set(reference["grads"]) ^ set(other["grads"]))
    least = min(cosines.values()) if cosines else 1.0
    agrees = other["tokens"] == reference["tokens"]
    ok = (
        loss_error <= loss_tol
        and logits_error <= logits_tol
        and least >= cosine_tol
        and not missing
        and (agrees or dtype != "float32")  # half precision may tip a near-tie in greedy decoding
    )
    return {
        "loss_relative_error": loss_error,
        "logits_rms_error_over_spread": logits_error,
        "least_gradient_cosine": least,
        "trained_tensors": len(cosines),
        "gradients_missing": missing,
        "greedy_tokens_agree": agrees,
        "tolerance": {"loss": loss_tol, "logits": logits_tol, "gradient_cosine": cosine_tol},
        "ok": ok,
    }


def check_parity(recipe_path: Path, overrides: tuple[str, ...], shapes: Shapes, device: str) -> dict[str, Any]:
    """Build the reference and each variant with the reference's weights and compare them.

    Returns ``{"reference": "...", "variants": [{device, dtype, attention, ...errors, ok}], "ok": bool}``.
    """
    from m2pt_cli.loading import build

    def built(where: str, dtype: str, kernel: str):
        recipe = recipe_config.load(
            recipe_path, overrides + (f"model.dtype={dtype}", f"model.attn_implementation={kernel}")
        )
        return build(recipe, device=where)

    reference_model, processor = built(*REFERENCE)
    state = reference_model.state_dict()
    torch.manual_seed(0)
    batch = padded_batch(reference_model, processor, shapes, "cpu")
    reference = _outputs(reference_model, batch)
    del reference_model
    rows = []
    for where, dtype, kernel in variants(device):
        weights = "float32" if dtype == AUTOCAST else dtype
        model, _ = built(where, weights, kernel)
        model.load_state_dict(state)  # the same weights wherever the base's were drawn; cast to dtype
        cast = getattr(torch, weights)
        moved = {k: v.to(where, cast) if v.is_floating_point() else v.to(where) for k, v in batch.items()}
        row = {"device": where, "dtype": dtype, "attention": kernel}
        row.update(_compare(reference, _outputs(model, moved, autocast=dtype == AUTOCAST), dtype))
        rows.append(row)
        del model
    return {"reference": "/".join(REFERENCE), "variants": rows, "ok": all(r["ok"] for r in rows)}
