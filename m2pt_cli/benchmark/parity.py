"""Kernel and precision parity: the same M²PT model and padded batch under each attention kernel and
dtype the machine offers, against float32 eager attention on CPU (the path the mechanism tests check
against their reference implementations).

Each variant is compared on the loss, the logits of the answer tokens, the gradients of every trained
tensor (the prompts among them) and eight greedy tokens decoded with the KV cache from a left-padded
row. The batch holds an unpadded row, right-padded rows (as training pads) and left-padded rows (as
evaluation and serving pad), so a kernel that loses the padding mask shows. Half-precision variants
are held to a multiple of the error bf16 has on CPU with eager attention, measured in the same run
(the ``yardstick``): the noise of the format, not of a kernel.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from m2pt_cli import config as recipe_config
from m2pt_cli.benchmark.methods import Shapes, synthetic_batch

REFERENCE = ("cpu", "float32", "eager")

YARDSTICK = ("cpu", "bfloat16", "eager")  # the format's own noise, against which half precision is held

GREEDY_TOKENS = 8

AUTOCAST = "float32+autocast-bf16"  # float32 weights under bf16 autocast, as the Trainer's bf16 runs them

# float32: (loss relative error, logits' RMS error over the reference logits' spread, least gradient cosine)
FLOAT32_TOLERANCE = (1e-4, 1e-3, 0.9999)

HALF_FLOOR = (5e-3, 0.02, 0.999)  # half-precision limits are never tighter than these

HALF_CEILING = (2e-2, 0.15, 0.98)  # nor looser than these, however noisy the yardstick

HALF_MARGIN = 3.0  # a half-precision variant may err this many times the yardstick


def variants(device: str) -> list[tuple[str, str, str]]:
    """(device, dtype, attention kernel) for each variant this machine can run besides the reference."""
    if not device.startswith("cuda"):
        return [("cpu", "float32", "sdpa"), YARDSTICK, ("cpu", "bfloat16", "sdpa"), ("cpu", AUTOCAST, "sdpa")]
    found = [(device, dtype, kernel) for dtype in ("float32", "bfloat16", AUTOCAST) for kernel in ("eager", "sdpa")]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append((device, "bfloat16", "flash_attention_2"))
    return found


def padded_batch(model, processor, shapes: Shapes, device: str) -> dict[str, torch.Tensor]:
    """The bench's synthetic batch, row 0 whole, the others shortened by ``i * seq_len / (2 * batch)``
    tokens: odd rows right-padded (as the training collator pads), even rows left-padded (as
    evaluation and serving pad). Padding has attention mask 0 and label -100."""
    batch = synthetic_batch(model, processor, shapes, device)
    pad = processor.tokenizer.pad_token_id or 0
    for row in range(1, shapes.batch_size):
        cut = row * shapes.seq_len // (2 * shapes.batch_size)
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100)):
            values = batch[key][row].clone()
            if row % 2:  # right: the tail goes
                values[shapes.seq_len - cut :] = fill
            else:  # left: the row moves right, the head fills with padding
                values = torch.cat([torch.full((cut,), fill, dtype=values.dtype), values[: shapes.seq_len - cut]])
            batch[key][row] = values
    return batch


def _left_padded_row(batch_size: int) -> int:
    """The row greedy decoding starts from: the first left-padded one (row 0 when there is none)."""
    return 2 if batch_size > 2 else 0


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
    row = _left_padded_row(len(batch["input_ids"]))
    inputs = {k: v[row : row + 1] for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        tokens = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False, use_cache=True)
    return {
        "loss": result.loss.detach().float().cpu().item(),
        "logits": result.logits.detach().float().cpu()[answer.cpu()],
        "grads": grads,
        "tokens": tokens[0, -GREEDY_TOKENS:].cpu().tolist(),
    }


def _errors(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    loss_error = abs(other["loss"] - reference["loss"]) / abs(reference["loss"])
    spread = reference["logits"].std().item()
    logits_error = (other["logits"] - reference["logits"]).pow(2).mean().sqrt().item() / spread
    cosines = [
        torch.nn.functional.cosine_similarity(grad.flatten(), other["grads"][name].flatten(), dim=0).item()
        for name, grad in reference["grads"].items()
        if name in other["grads"]
    ]
    return {
        "loss_relative_error": loss_error,
        "logits_rms_error_over_spread": logits_error,
        "least_gradient_cosine": min(cosines, default=1.0),
        "trained_tensors": len(cosines),
        "gradients_missing": sorted(set(reference["grads"]) ^ set(other["grads"])),
        "greedy_tokens_agree": other["tokens"] == reference["tokens"],
    }


def half_tolerance(yardstick: dict[str, Any]) -> tuple[float, float, float]:
    """Half-precision limits: ``HALF_MARGIN`` times the yardstick's errors, within ``HALF_FLOOR`` and
    ``HALF_CEILING`` (a broken yardstick does not excuse the rest: it fails the ceiling itself)."""
    (loss_lo, logits_lo, cosine_lo), (loss_hi, logits_hi, cosine_hi) = HALF_FLOOR, HALF_CEILING
    return (
        min(loss_hi, max(loss_lo, HALF_MARGIN * yardstick["loss_relative_error"])),
        min(logits_hi, max(logits_lo, HALF_MARGIN * yardstick["logits_rms_error_over_spread"])),
        max(cosine_hi, min(cosine_lo, 1 - HALF_MARGIN * (1 - yardstick["least_gradient_cosine"]))),
    )


def _judged(errors: dict[str, Any], dtype: str, tolerance: tuple[float, float, float]) -> dict[str, Any]:
    loss_tol, logits_tol, cosine_tol = tolerance
    ok = (
        errors["loss_relative_error"] <= loss_tol
        and errors["logits_rms_error_over_spread"] <= logits_tol
        and errors["least_gradient_cosine"] >= cosine_tol
        and not errors["gradients_missing"]
        and (errors["greedy_tokens_agree"] or dtype != "float32")  # half precision may tip a near-tie
    )
    return {**errors, "tolerance": {"loss": loss_tol, "logits": logits_tol, "gradient_cosine": cosine_tol}, "ok": ok}


@contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions while inside (cuDNN allows it by default): float32
    variants are compared at float32's precision."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def check_parity(recipe_path: Path, overrides: tuple[str, ...], shapes: Shapes, device: str) -> dict[str, Any]:
    """Build the reference, the yardstick and each variant with the reference's weights; compare.

    Returns ``{"reference", "yardstick", "variants": [{device, dtype, attention, ...errors, tolerance,
    ok}], "ok"}``.
    """
    from m2pt_cli.loading import build

    def built(where: str, weights: str, kernel: str):
        keys = (f"model.dtype={weights}", f"model.attn_implementation={kernel}")
        return build(recipe_config.load(recipe_path, overrides + keys), device=where)

    def outputs_of(where: str, dtype: str, kernel: str) -> dict[str, Any]:
        weights = "float32" if dtype == AUTOCAST else dtype
        model, _ = built(where, weights, kernel)
        model.load_state_dict(state)  # the same weights wherever the base's were drawn; cast to dtype
        cast = getattr(torch, weights)
        moved = {k: v.to(where, cast) if v.is_floating_point() else v.to(where) for k, v in batch.items()}
        return _outputs(model, moved, autocast=dtype == AUTOCAST)

    reference_model, processor = built(*REFERENCE)
    state = reference_model.state_dict()
    batch = padded_batch(reference_model, processor, shapes, "cpu")
    with exact_float32():
        reference = _outputs(reference_model, batch)
        del reference_model
        yardstick = _errors(reference, outputs_of(*YARDSTICK))
        half = half_tolerance(yardstick)
        rows = []
        for where, dtype, kernel in variants(device):
            errors = (
                yardstick
                if (where, dtype, kernel) == YARDSTICK
                else _errors(reference, outputs_of(where, dtype, kernel))
            )
            tolerance = FLOAT32_TOLERANCE if dtype == "float32" else half
            rows.append({"device": where, "dtype": dtype, "attention": kernel, **_judged(errors, dtype, tolerance)})
    return {
        "reference": "/".join(REFERENCE),
        "yardstick": {"variant": "/".join(YARDSTICK), **yardstick},
        "variants": rows,
        "ok": all(r["ok"] for r in rows),
    }
