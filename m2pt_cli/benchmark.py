"""``m2pt bench``: step time, memory and decode speed of M²PT against LoRA, full finetuning and a floor.

All methods are timed in one process, interleaved step by step, so drift hits all of them alike.
Peak memory is measured per method in a child process (CUDA peak allocated on a GPU, peak RSS on CPU).
"""

from __future__ import annotations

import gc
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
from m2pt_cli.recipes import display_name

METHODS = ("m2pt", "lora", "full", "vision-only", "text-only", "floor", "limit")
FROZEN = ("floor", "limit")  # nothing trained: the floors a method's step time is held to
DECODE_TOKENS = 32  # new tokens per timed generate (the prefill is timed apart and left out)
EVAL_BATCH_SIZE = 8  # m2pt eval's default --batch-size (EvalSettings.batch_size)
EVAL_NEW_TOKENS = 16  # at most, per answer, in the evaluation throughput
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


def split_method(name: str) -> tuple[str, tuple[str, ...]]:
    """A ``--methods`` entry as (method, overrides): ``m2pt@4bit`` is m2pt on a 4-bit base
    (``model.quantization``), so quantization modes are timed side by side like methods."""
    method, at, mode = name.partition("@")
    if method not in METHOD_OVERRIDES:
        raise UserError(f"--methods: {method!r} is not a method (allowed: {', '.join(METHODS)})")
    if at and mode not in recipe_config.QUANTIZATION_MODES:
        allowed = ", ".join(recipe_config.QUANTIZATION_MODES)
        raise UserError(f"--methods: {name!r}: {mode!r} is not a model.quantization mode (allowed: {allowed})")
    return method, METHOD_OVERRIDES[method] + ((f"model.quantization={mode}",) if at else ())


def method_recipe(recipe_path: Path, method: str, overrides: tuple[str, ...]) -> Recipe:
    return recipe_config.load(recipe_path, tuple(overrides) + split_method(method)[1])


def build_method(recipe_path: Path, method: str, overrides: tuple[str, ...], device: str):
    """(model, processor, optimizer or None) for one method, in training mode."""
    from m2pt_cli.loading import build

    recipe = method_recipe(recipe_path, method, overrides)
    model, processor = build(recipe, device=device)
    model.train()
    method = split_method(method)[0]
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
    images = noise_images(shapes.batch_size, generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch.update(backbone.image_inputs(processor, images, ["Describe the image."] * shapes.batch_size))
    return {k: v.to(device) for k, v in batch.items()}


def noise_images(count: int, seed: int = 0, generator: torch.Generator | None = None) -> list:
    """``count`` RGB noise images of 64 x 64 pixels (the processor resizes them), seeded."""
    from PIL import Image

    generator = generator or torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (count, 64, 64, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(n.numpy()) for n in noise]


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


def _generate_seconds(model, inputs: dict, new_tokens: int, device: str) -> float:
    """Wall time of one greedy ``generate`` of exactly ``new_tokens`` tokens with the KV cache."""
    _sync(device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    _sync(device)
    return time.perf_counter() - start


def decode_tokens_per_second(models: dict[str, Any], batch, new_tokens: int, repeats: int, device: str) -> dict:
    """Decode speed of each model on the first sample of ``batch``, prefill excluded: ``new_tokens - 1``
    cached steps over the median time of ``new_tokens`` tokens minus that of one (the prefill).

    Same input, same number of tokens for every model; one warm-up each, then the models take turns.
    """
    inputs = {k: v[:1] for k, v in batch.items() if k != "labels"}
    times: dict[str, dict[int, list[float]]] = {name: {1: [], new_tokens: []} for name in models}
    for model in models.values():  # warm-up
        _generate_seconds(model, inputs, 2, device)
    for _ in range(repeats):
        for name, model in models.items():
            for count in (1, new_tokens):
                times[name][count].append(_generate_seconds(model, inputs, count, device))
    rates = {}
    for name, by_count in times.items():
        decode = statistics.median(by_count[new_tokens]) - statistics.median(by_count[1])
        rates[name] = (new_tokens - 1) / max(decode, 1e-9)
    return rates


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
    prompt_path: bool = True,
    eval_batch_size: int | None = EVAL_BATCH_SIZE,
) -> dict[str, Any]:
    """Measure every method; returns the report (rows, the prompt-path checks and the evaluation
    throughput, each but the rows when asked for and m2pt is among ``methods``).

    The methods' models are freed before the memory probes, so that a probe (a child process) never
    shares the machine's memory with them. ``eval_batch_size`` None skips the evaluation throughput.
    """
    recipe = recipe_config.load(recipe_path, overrides)  # defaults: the recipe's own batch shape
    shapes = Shapes(batch_size or recipe.train.per_device_batch_size, seq_len or recipe.data.max_length)
    torch.manual_seed(0)
    built = {m: build_method(recipe_path, m, overrides, device) for m in methods}
    any_model, any_processor, _ = next(iter(built.values()))
    batch = synthetic_batch(any_model, any_processor, shapes, device)
    del any_model, any_processor
    arms = {method: (model, optimizer, batch) for method, (model, _, optimizer) in built.items()}
    times = _time_steps(arms, steps, warmup, device)
    del arms
    rows = [_row(method, built[method], times[method]) for method in methods]
    reference = next((r for r in rows if r["method"] == "m2pt"), rows[0])
    for row in rows:
        row["ratio_to_m2pt"] = row["step_seconds_median"] / reference["step_seconds_median"]
    report: dict[str, Any] = {**_setting(recipe_path, overrides, device, shapes, steps, warmup), "rows": rows}
    for frozen in FROZEN:
        if "m2pt" in built and frozen in built:
            floor_row = next(r for r in rows if r["method"] == frozen)
            report[f"m2pt_over_{frozen}"] = reference["step_seconds_median"] / floor_row["step_seconds_median"]
    if "m2pt" in built and prompt_path:
        report.update(_prompt_path(built["m2pt"][0], recipe_path, overrides, batch, shapes, device))
    if "m2pt" in built and eval_batch_size is not None:
        model, processor, _ = built["m2pt"]
        recipe = method_recipe(recipe_path, "m2pt", overrides)
        report.update(eval_throughput(model, processor, recipe, eval_batch_size, EVAL_NEW_TOKENS, 3, device))
        del model, processor
    built.clear()  # the probes below run one method each in a child process: leave them the memory
    gc.collect()
    if memory:
        for row in rows:
            row["peak_memory_bytes"] = peak_memory_child(recipe_path, row["method"], overrides, shapes, 2, device)
    return report


def _setting(
    recipe_path: Path, overrides: tuple[str, ...], device: str, shapes: Shapes, steps: int, warmup: int
) -> dict[str, Any]:
    """What a report was measured on: recipe, overrides, device, machine, date, shapes, steps."""
    return {
        "recipe": str(recipe_path),
        "overrides": list(overrides),
        "device": device,
        "hardware": _hardware(device),
        "date": time.strftime("%Y-%m-%d"),
        "batch_size": shapes.batch_size,
        "seq_len": shapes.seq_len,
        "steps": steps,
        "warmup": warmup,
    }


def _time_steps(arms: dict[Any, tuple], steps: int, warmup: int, device: str) -> dict[Any, list[float]]:
    """Seconds of each timed training step per arm (model, optimizer, batch), the arms taking turns
    step by step."""
    times: dict[Any, list[float]] = {name: [] for name in arms}
    for step in range(warmup + steps):
        for method, (model, optimizer, batch) in arms.items():  # interleaved: drift hits every arm alike
            _sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            _sync(device)
            if step >= warmup:
                times[method].append(time.perf_counter() - start)
    return times


def _row(method: str, built: tuple, times: list[float]) -> dict[str, Any]:
    """One method's row: step-time statistics and what it trains and stores."""
    model, _, optimizer = built
    samples = sorted(times)
    return {
        "method": method,
        "step_seconds_median": statistics.median(samples),
        "step_seconds_p10": _percentile(samples, 0.1),
        "step_seconds_p90": _percentile(samples, 0.9),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_bytes(optimizer),
        "adapter_bytes": sum(t.nbytes for t in model.adapter_state_dict().values())
        if split_method(method)[0] not in FROZEN
        else 0,
    }


EVAL_QUESTIONS = (
    "Describe the image.",
    "What colour is the largest object?",
    "Is there a dog in the picture? Answer yes or no.",
    "How many people can you see, and what are they doing?",
)


def eval_throughput(
    model, processor, recipe: Recipe, batch_size: int, max_new_tokens: int, repeats: int, device: str
) -> dict[str, Any]:
    """Greedy samples per second through the evaluation path (``LoadedModel.answer``, hence
    ``generate_answers``): ``batch_size`` noise images with questions of several lengths, answered
    one at a time and in one left-padded batch, taking turns; one warm-up each.
    """
    from m2pt_cli.answering import LoadedModel

    loaded = LoadedModel(model=model, processor=processor, recipe=recipe, backbone=model.backbone)
    images = noise_images(batch_size, seed=1)
    questions = [EVAL_QUESTIONS[i % len(EVAL_QUESTIONS)] for i in range(batch_size)]
    sizes = (1, batch_size)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    answers: dict[int, list[str]] = {}
    for size in sizes:  # warm-up
        loaded.answer(images[:size], questions[:size], max_new_tokens, size)
    for _ in range(repeats):
        for size in sizes:
            _sync(device)
            start = time.perf_counter()
            answers[size] = loaded.answer(images, questions, max_new_tokens, size)
            _sync(device)
            times[size].append(time.perf_counter() - start)
    one, many = (batch_size / statistics.median(times[size]) for size in sizes)
    return {
        "eval_samples": batch_size,
        "eval_max_new_tokens": max_new_tokens,
        "eval_batch_size": batch_size,
        "eval_samples_per_second_batch_1": one,
        "eval_samples_per_second_batch_default": many,
        "eval_batch_speedup": many / one,
        "eval_answers_agree": answers[1] == answers[batch_size],
    }


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
    rates = decode_tokens_per_second({"with": model, "without": plain}, batch, DECODE_TOKENS, 5, device)
    decode_with, decode_without = rates["with"], rates["without"]
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
        f"`m2pt bench {display_name(report['recipe'])}` on {report['hardware']} ({report['device']}), "
        f"{report['date']}; "
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
            f"greedy decode with KV cache (batch 1, {DECODE_TOKENS} tokens, prefill excluded): "
            f"{report['decode_tokens_per_second_with_prompts']:.0f} tokens/s with prompts, "
            f"{report['decode_tokens_per_second_without_prompts']:.0f} without ({report['decode_ratio']:.2f}x)"
        )
    if "eval_batch_speedup" in report:
        extra.append(
            f"evaluation (greedy, {report['eval_samples']} samples, at most {report['eval_max_new_tokens']} new "
            f"tokens, LoadedModel.answer): {report['eval_samples_per_second_batch_1']:.2f} samples/s at batch 1, "
            f"{report['eval_samples_per_second_batch_default']:.2f} at batch {report['eval_batch_size']} "
            f"({report['eval_batch_speedup']:.2f}x; same answers: {'yes' if report['eval_answers_agree'] else 'no'})"
        )
    return "\n".join(lines + [""] + [f"- {line}" for line in extra]) + "\n"


def write_report(path: Path, report: dict[str, Any], table: str) -> None:
    """JSON report and its markdown table, each written through a temporary file."""
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(path.with_suffix(".md"), table)


# -- cost curves: m2pt's step time and memory over prompt length and over sequence length ----------

# axis -> what one point sets: the LLM's prompt length (recipe override) or the tokens per row
CURVE_AXES = {"prompt": "prompts.text.length", "seq": "--seq-len"}


def parse_curve(spec: str) -> tuple[str, list[int]]:
    """``prompt=0,5,10`` or ``seq=128,256`` -> (axis, ascending distinct values).

    Raises:
        UserError: another axis, a value that is not a whole number, a negative prompt length, a
            sequence length under 8, or fewer than two points.
    """
    axis, sep, listed = spec.partition("=")
    if not sep or axis not in CURVE_AXES:
        raise UserError(f"--curve: {spec!r} is not AXIS=V1,V2,... with AXIS one of {', '.join(CURVE_AXES)}")
    try:
        values = sorted({int(v) for v in listed.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--curve: {spec!r} holds a value that is not a whole number") from None
    lowest = 0 if axis == "prompt" else 8
    if len(values) < 2 or values[0] < lowest:
        raise UserError(f"--curve: {spec!r} needs at least two values, each at least {lowest}")
    return axis, values


def curve(
    recipe_path: Path,
    axis: str,
    values: list[int],
    overrides: tuple[str, ...],
    steps: int,
    warmup: int,
    shapes: Shapes,
    device: str,
    memory: bool = True,
) -> dict[str, Any]:
    """m2pt's training step time (the points taking turns) and peak memory at each point of ``axis``.

    ``prompt``: one model per prompt length (``prompts.text.length``; visual prompts as the recipe
    has them), one batch of ``shapes``. ``seq``: one model, one batch per sequence length. Also the
    least-squares slope of step time and of memory per token a point adds to each row.
    """
    torch.manual_seed(0)
    point_overrides = {v: (f"prompts.text.length={v}",) if axis == "prompt" else () for v in values}
    if axis == "prompt":
        built = {v: build_method(recipe_path, "m2pt", overrides + point_overrides[v], device) for v in values}
        batch = synthetic_batch(built[values[0]][0], built[values[0]][1], shapes, device)
        arms = {v: (model, optimizer, batch) for v, (model, _, optimizer) in built.items()}
        point_shapes = dict.fromkeys(values, shapes)
    else:
        model, processor, optimizer = build_method(recipe_path, "m2pt", overrides, device)
        point_shapes = {v: Shapes(shapes.batch_size, v) for v in values}
        arms = {v: (model, optimizer, synthetic_batch(model, processor, point_shapes[v], device)) for v in values}
    times = _time_steps(arms, steps, warmup, device)
    arms.clear()
    gc.collect()
    points = []
    for v in values:
        samples = sorted(times[v])
        point = {
            "value": v,
            "tokens_added": v - values[0],
            "step_seconds_median": statistics.median(samples),
            "step_seconds_p10": _percentile(samples, 0.1),
            "step_seconds_p90": _percentile(samples, 0.9),
        }
        if memory:
            point["peak_memory_bytes"] = peak_memory_child(
                recipe_path, "m2pt", overrides + point_overrides[v], point_shapes[v], 2, device
            )
        points.append(point)
    added = [p["tokens_added"] for p in points]
    result = {"setting": CURVE_AXES[axis], "points": points}
    result["slope_seconds_per_token"] = _slope(added, [p["step_seconds_median"] for p in points])
    if memory:
        result["slope_bytes_per_token"] = _slope(added, [p["peak_memory_bytes"] for p in points])
    return result


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def curves_report(
    recipe_path: Path,
    overrides: tuple[str, ...],
    shapes: Shapes,
    steps: int,
    warmup: int,
    device: str,
    curves: dict[str, dict],
) -> dict[str, Any]:
    """The report of ``m2pt bench --curve``: each curve, and the prompt / text slope ratio when both ran."""
    report: dict[str, Any] = {**_setting(recipe_path, overrides, device, shapes, steps, warmup), "curves": curves}
    if {"prompt", "seq"} <= set(curves):
        prompt, text = curves["prompt"], curves["seq"]
        report["prompt_over_text_slope"] = prompt["slope_seconds_per_token"] / text["slope_seconds_per_token"]
        if "slope_bytes_per_token" in prompt and "slope_bytes_per_token" in text:
            report["prompt_over_text_memory_slope"] = prompt["slope_bytes_per_token"] / text["slope_bytes_per_token"]
    return report


def curves_markdown(report: dict[str, Any]) -> str:
    """The README table of ``m2pt bench --curve``."""
    lines = [
        f"`m2pt bench {display_name(report['recipe'])} --curve` on {report['hardware']} ({report['device']}), "
        f"{report['date']}; "
        f"batch {report['batch_size']}, median of {report['steps']} steps",
        "",
        "| curve | value | tokens added per row | step (ms) | p10-p90 (ms) | peak memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    extra = []
    for axis, result in report["curves"].items():
        for p in result["points"]:
            memory = f"{p['peak_memory_bytes'] / 2**20:.0f}" if "peak_memory_bytes" in p else "n/a"
            lines.append(
                f"| {axis} ({result['setting']}) | {p['value']} | {p['tokens_added']} | "
                f"{1000 * p['step_seconds_median']:.1f} | {1000 * p['step_seconds_p10']:.1f}-"
                f"{1000 * p['step_seconds_p90']:.1f} | {memory} |"
            )
        slope = f"{axis}: {1000 * result['slope_seconds_per_token']:.3f} ms per added token"
        if "slope_bytes_per_token" in result:
            slope += f", {result['slope_bytes_per_token'] / 1024:.1f} KiB peak memory per added token"
        extra.append(slope)
    if "prompt_over_text_slope" in report:
        ratio = f"per prompt token / per text token: {report['prompt_over_text_slope']:.2f}x step time"
        if "prompt_over_text_memory_slope" in report:
            ratio += f", {report['prompt_over_text_memory_slope']:.2f}x memory"
        extra.append(ratio)
    return "\n".join(lines + [""] + [f"- {line}" for line in extra]) + "\n"


def plot_curves(report: dict[str, Any], path: Path) -> Path:
    """PNG: step time and peak memory over the tokens each curve adds per row (a line per curve)."""
    from m2pt_cli.plots import SIZE_INCHES, _pyplot, _save

    plt = _pyplot()
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(SIZE_INCHES[0] * 1.6, SIZE_INCHES[1]))
    for axis, result in report["curves"].items():
        added = [p["tokens_added"] for p in result["points"]]
        label = f"{axis} ({result['setting']})"
        time_ax.plot(added, [1000 * p["step_seconds_median"] for p in result["points"]], marker="o", label=label)
        if all("peak_memory_bytes" in p for p in result["points"]):
            memory = [p["peak_memory_bytes"] / 2**20 for p in result["points"]]
            memory_ax.plot(added, memory, marker="o", label=label)
    time_ax.set(xlabel="tokens added per row", ylabel="training step (ms)", title="step time")
    memory_ax.set(xlabel="tokens added per row", ylabel="peak memory (MiB)", title="peak memory")
    for ax in (time_ax, memory_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"m2pt bench {Path(report['recipe']).stem}: cost per added token")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
