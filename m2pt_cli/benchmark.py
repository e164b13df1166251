"""``m2pt bench``: step time, memory and decode speed of M²PT against LoRA, full finetuning and a floor.

All methods are timed in one process, interleaved step by step, so drift hits all of them alike.
Peak memory is measured per method in a child process (CUDA peak allocated on a GPU, peak RSS on CPU).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m2pt_cli import config as recipe_config
from m2pt_cli import trust
from m2pt_cli.config import Recipe
from m2pt_cli.errors import UserError
from m2pt_cli.files import write_text_atomic

METHODS = ("m2pt", "lora", "full", "vision-only", "text-only", "floor", "limit")
FROZEN = ("floor", "limit")  # nothing trained: the floors a method's step time is held to
METHOD_OVERRIDES = {
    "m2pt": (),
    "lora": ("method=lora",),
    "full": ("method=full",),
    "vision-only": ("prompts.text.length=0",),
    "text-only": ("prompts.vision.length=0",),
    # every weight frozen, gradients flow back to the inputs of both towers: the floor of any method
    # with prompts in the vision encoder (they sit in its first layer, so back-propagation runs through it)
    "floor": ("prompts.vision.length=0", "prompts.text.length=0", "trainable=[]"),
    # every weight frozen, gradients flow back to the LLM's input embeddings only: the floor of text prompts
    "limit": ("prompts.vision.length=0", "prompts.text.length=0", "trainable=[]"),
}


@dataclass
class Shapes:
    batch_size: int
    seq_len: int


def method_recipe(recipe_path: Path, method: str, overrides: tuple[str, ...]) -> Recipe:
    if method not in METHOD_OVERRIDES:
        raise UserError(f"--methods: {method!r} is not a method (allowed: {', '.join(METHODS)})")
    return recipe_config.load(recipe_path, tuple(overrides) + METHOD_OVERRIDES[method])


def build_method(recipe_path: Path, method: str, overrides: tuple[str, ...], device: str):
    """(model, processor, optimizer or None) for one method, in training mode."""
    from m2pt_cli.loading import build

    recipe = method_recipe(recipe_path, method, overrides)
    model, processor = build(recipe, device=device)
    model.train()
    if method in FROZEN:
        embed = model.backbone.language_tower(model.base).embed
        embed.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    if method == "floor":
        first_block = model.backbone.vision_tower(model.base).blocks[0]
        first_block.register_forward_pre_hook(_hidden_states_need_grad, with_kwargs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, processor, optimizer


def _hidden_states_need_grad(module, args: tuple, kwargs: dict) -> None:
    """Make the hidden states entering a block a leaf that needs gradients (the floor's vision input)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and not hidden.requires_grad:
        hidden.requires_grad_(True)


def synthetic_batch(model, processor, shapes: Shapes, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens of the recipe's shapes with one noise image per sample, labels on every text token.

    The image tokens sit where the backbone puts them (``backbone.place_image_tokens`` on a bare
    image placeholder); random token ids fill the rest of ``seq_len``.
    """
    from PIL import Image

    backbone = model.backbone
    generator = torch.Generator().manual_seed(seed)
    image_id = backbone.image_token_id(processor)
    placeholder = "<image>" if backbone.image_in_text else ""
    head = backbone.place_image_tokens(processor, processor.tokenizer(placeholder)["input_ids"])
    if shapes.seq_len <= len(head) + 1:
        raise UserError(f"--seq-len: {shapes.seq_len} leaves no text after {len(head)} image and start tokens")
    vocab = backbone.language_tower(model.base).embed.num_embeddings
    ids = torch.randint(10, vocab, (shapes.batch_size, shapes.seq_len), generator=generator)
    ids[ids == image_id] = 10
    ids[:, : len(head)] = torch.tensor(head)
    labels = ids.clone()
    labels[:, : len(head)] = -100
    noise = torch.randint(0, 256, (shapes.batch_size, 64, 64, 3), generator=generator, dtype=torch.uint8)
    images = [Image.fromarray(n.numpy()) for n in noise]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch.update(backbone.image_inputs(processor, images, ["Describe the image."] * shapes.batch_size))
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def optimizer_bytes(optimizer) -> int:
    if optimizer is None:
        return 0
    return sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def peak_memory_child(
    recipe: Path, method: str, overrides: tuple[str, ...], shapes: Shapes, steps: int, device: str
) -> int:
    """Peak memory of building one method and running ``steps`` training steps, in a fresh process
    (bytes; on CPU the peak resident set above what the imports take)."""
    payload = json.dumps(
        {
            "recipe": str(recipe),
            "method": method,
            "overrides": list(overrides),
            "batch_size": shapes.batch_size,
            "seq_len": shapes.seq_len,
            "steps": steps,
            "device": device,
            "trust_remote_code": trust.remote_code_granted(),  # the parent's command line, handed on
        }
    )
    code = "import sys, m2pt_cli.benchmark as b; b.child_main(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe for {method} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_main(payload: str) -> None:
    """Entry point of the memory probe: run the steps, print the peak in bytes.

    On CPU: the model's weights plus the peak resident set during the steps above the resident set
    just before them (activations, gradients, optimizer state), sampled every millisecond; import
    and loading overheads, the same for every method, are left out.
    """
    import threading

    args = json.loads(payload)
    device = args["device"]
    shapes = Shapes(args["batch_size"], args["seq_len"])
    with trust.remote_code(args["trust_remote_code"]):
        model, processor, optimizer = build_method(
            Path(args["recipe"]), args["method"], tuple(args["overrides"]), device
        )
    batch = synthetic_batch(model, processor, shapes, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args["steps"]):
            train_step(model, optimizer, batch)
        _sync(device)
        print(torch.cuda.max_memory_allocated())
        return
    weights = sum(t.nbytes for t in model.state_dict().values())
    before, peak, running = _rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(args["steps"]):
        train_step(model, optimizer, batch)
    running[0] = False
    sampler.join()
    print(weights + max(peak[0] - before, 0))


def _forward_seconds(model, batch, repeats: int, device: str) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode_tokens_per_second(model, batch, new_tokens: int, repeats: int, device: str) -> float:
    inputs = {k: v[:1] for k, v in batch.items() if k != "labels"}
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        _sync(device)
        rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def run(
    recipe_path: Path,
    methods: list[str],
    overrides: tuple[str, ...],
    steps: int,
    warmup: int,
    batch_size: int | None,
    seq_len: int | None,
    device: str,
    memory: bool = True,
) -> dict[str, Any]:
    """Measure every method; returns the report (rows plus the prompt-path checks)."""
    recipe = recipe_config.load(recipe_path, overrides)  # defaults: the recipe's own batch shape
    shapes = Shapes(batch_size or recipe.train.per_device_batch_size, seq_len or recipe.data.max_length)
    torch.manual_seed(0)
    built = {m: build_method(recipe_path, m, overrides, device) for m in methods}
    any_model, any_processor, _ = next(iter(built.values()))
    batch = synthetic_batch(any_model, any_processor, shapes, device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for step in range(warmup + steps):
        for method in methods:  # interleaved: drift hits every method alike
            model, _, optimizer = built[method]
            _sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            _sync(device)
            if step >= warmup:
                times[method].append(time.perf_counter() - start)
    rows = []
    for method in methods:
        model, _, optimizer = built[method]
        samples = sorted(times[method])
        row = {
            "method": method,
            "step_seconds_median": statistics.median(samples),
            "step_seconds_p10": _percentile(samples, 0.1),
            "step_seconds_p90": _percentile(samples, 0.9),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": optimizer_bytes(optimizer),
            "adapter_bytes": sum(t.nbytes for t in model.adapter_state_dict().values()) if method not in FROZEN else 0,
        }
        if memory:
            row["peak_memory_bytes"] = peak_memory_child(recipe_path, method, overrides, shapes, 2, device)
        rows.append(row)
    reference = next((r for r in rows if r["method"] == "m2pt"), rows[0])
    for row in rows:
        row["ratio_to_m2pt"] = row["step_seconds_median"] / reference["step_seconds_median"]
    report: dict[str, Any] = {
        "recipe": str(recipe_path),
        "overrides": list(overrides),
        "device": device,
        "hardware": _hardware(device),
        "date": time.strftime("%Y-%m-%d"),
        "batch_size": shapes.batch_size,
        "seq_len": shapes.seq_len,
        "steps": steps,
        "warmup": warmup,
        "rows": rows,
    }
    for frozen in FROZEN:
        if "m2pt" in built and frozen in built:
            floor_row = next(r for r in rows if r["method"] == frozen)
            report[f"m2pt_over_{frozen}"] = reference["step_seconds_median"] / floor_row["step_seconds_median"]
    if "m2pt" in built:
        report.update(_prompt_path(built["m2pt"][0], recipe_path, overrides, batch, shapes, device))
    return report


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _prompt_path(model, recipe_path: Path, overrides: tuple[str, ...], batch, shapes: Shapes, device: str) -> dict:
    """Forward and decode cost of the prompts against the same model without them."""
    from m2pt_cli.loading import build

    plain_recipe = recipe_config.load(recipe_path, tuple(overrides) + METHOD_OVERRIDES["limit"][:2])
    plain, _ = build(plain_recipe, device=device)
    model.eval()
    plain.eval()
    _forward_seconds(model, batch, 2, device)
    seen: list[int] = []  # the vision encoder's sequence length without prompts (patches + CLS)
    first_block = plain.backbone.vision_tower(plain.base).blocks[0]
    handle = first_block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    _forward_seconds(plain, batch, 2, device)
    handle.remove()
    with_prompts, without = [], []
    for _ in range(5):  # interleaved
        with_prompts.append(_forward_seconds(model, batch, 1, device))
        without.append(_forward_seconds(plain, batch, 1, device))
    cfg = model.m2pt_config
    n_image = seen[0]
    vision_cost = lambda extra: sum(  # noqa: E731 - tokens x width^2 per block
        (n_image + (extra if i in cfg.vision_layers else 0)) * cfg.vision_width**2
        for i in range(cfg.vision_total_layers)
    )
    text_prefix = cfg.text_length if cfg.text_layers else 0
    text_cost = lambda extra: (shapes.seq_len + extra) * cfg.text_width**2 * cfg.text_total_layers  # noqa: E731
    token_ratio = (vision_cost(cfg.vision_length) + text_cost(text_prefix)) / (vision_cost(0) + text_cost(0))
    decode_with = _decode_tokens_per_second(model, batch, 32, 3, device)
    decode_without = _decode_tokens_per_second(plain, batch, 32, 3, device)
    forward_ratio = statistics.median(with_prompts) / statistics.median(without)
    return {
        "forward_ratio": forward_ratio,
        "token_ratio": token_ratio,
        "forward_overhead_over_token_ratio": forward_ratio / token_ratio,
        "decode_tokens_per_second_with_prompts": decode_with,
        "decode_tokens_per_second_without_prompts": decode_without,
        "decode_ratio": decode_with / decode_without,
    }


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown(report: dict[str, Any]) -> str:
    """The README table."""
    lines = [
        f"`m2pt bench {report['recipe']}` on {report['hardware']} ({report['device']}), {report['date']}; "
        f"batch {report['batch_size']} x {report['seq_len']} tokens, median of {report['steps']} steps",
        "",
        "| method | step (ms) | p10-p90 (ms) | x m2pt | peak memory (MiB) | trainable | optimizer state (KiB) "
        "| adapter (KiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        memory = f"{r['peak_memory_bytes'] / 2**20:.0f}" if "peak_memory_bytes" in r else "n/a"
        lines.append(
            f"| {r['method']} | {1000 * r['step_seconds_median']:.1f} | {1000 * r['step_seconds_p10']:.1f}-"
            f"{1000 * r['step_seconds_p90']:.1f} | {r['ratio_to_m2pt']:.2f} | {memory} | {r['trainable_parameters']:,} "
            f"| {r['optimizer_state_bytes'] / 1024:.0f} | {r['adapter_bytes'] / 1024:.0f} |"
        )
    extra = []
    if "m2pt_over_floor" in report:
        extra.append(f"m2pt / floor step time: {report['m2pt_over_floor']:.2f} (gradients through both towers)")
    if "m2pt_over_limit" in report:
        extra.append(f"m2pt / limit step time: {report['m2pt_over_limit']:.2f} (gradients through the LLM only)")
    if "forward_ratio" in report:
        extra.append(
            f"forward with / without prompts: {report['forward_ratio']:.3f} (token ratio {report['token_ratio']:.3f}, "
            f"overhead {report['forward_overhead_over_token_ratio']:.3f}x)"
        )
        extra.append(
            f"greedy decode with KV cache: {report['decode_tokens_per_second_with_prompts']:.0f} tokens/s with "
            f"prompts, {report['decode_tokens_per_second_without_prompts']:.0f} without ({report['decode_ratio']:.2f}x)"
        )
    return "\n".join(lines + [""] + [f"- {line}" for line in extra]) + "\n"


def write_report(path: Path, report: dict[str, Any], table: str) -> None:
    """JSON report and its markdown table, each written through a temporary file."""
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(path.with_suffix(".md"), table)
