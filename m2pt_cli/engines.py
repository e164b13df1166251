"""The distributed engines a recipe can turn on: FSDP (``train.fsdp``, ``train.fsdp_config``) and
DeepSpeed (``train.deepspeed``), turned into the Trainer's arguments in their current form."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from m2pt_cli.errors import UserError, quote

CONFIG_BYTES = 1 << 20  # an engine config is a few hundred bytes
# transformers' legacy ``fsdp`` words and the fsdp_config entries they mean (FSDP2)
FSDP_WORDS = {
    "full_shard": ("reshard_after_forward", True),
    "shard_grad_op": ("reshard_after_forward", False),
    "offload": ("cpu_offload", True),
    "auto_wrap": None,  # the default auto_wrap_policy already wraps
}
DEEPSPEED_CONFIGS = ("zero2", "zero3")  # shipped as recipes/deepspeed/<name>.json


def _read_json(path: str, key: str) -> dict[str, Any]:
    from m2pt_cli.reading import read_bytes

    if not Path(path).is_file():
        raise UserError(f"{key}: {quote(path)} is not a file")
    data = read_bytes(Path(path), CONFIG_BYTES, "config")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}: {path} is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{key}: {path} holds {type(value).__name__}; expected a JSON object")
    return value


def fsdp_arguments(fsdp: bool | str, config_path: str) -> dict[str, Any]:
    """The Trainer's ``fsdp``/``fsdp_config`` for a recipe: ``fsdp=True`` and a dict (the current
    form; a string ``fsdp`` is deprecated in transformers 5), ``{}`` when FSDP is off.

    ``fsdp`` is true, or (older recipes) transformers' words such as ``"full_shard auto_wrap"``,
    which become the ``fsdp_config`` entries they stand for; the JSON file's own entries win."""
    words = fsdp.split() if isinstance(fsdp, str) else []
    if fsdp is False or (isinstance(fsdp, str) and not words):
        if config_path:
            raise UserError("train.fsdp_config: set, but train.fsdp is off; set train.fsdp=true to use it")
        return {}
    config = _read_json(config_path, "train.fsdp_config") if config_path else {}
    config = {key.removeprefix("fsdp_"): value for key, value in config.items()}
    for word in words:
        if word not in FSDP_WORDS:
            raise UserError(
                f"train.fsdp: {quote(word)} is not an FSDP option (allowed: true, or {', '.join(FSDP_WORDS)})"
            )
        if FSDP_WORDS[word] is not None:
            entry, value = FSDP_WORDS[word]
            config.setdefault(entry, value)
    return {"fsdp": True, "fsdp_config": config}


def trainer_arguments(fsdp: bool | str, fsdp_config: str, deepspeed: str, use_cpu: bool) -> dict[str, Any]:
    """``fsdp``, ``fsdp_config`` and ``deepspeed`` for ``TrainingArguments``, each checked. Neither
    engine runs on CPU processes (accelerate would train plain DDP, silently): refused there."""
    sharded = fsdp_arguments(fsdp, fsdp_config)
    config = deepspeed_config(deepspeed)
    if sharded and config:
        raise UserError("train.fsdp and train.deepspeed: both set; choose one engine")
    if sharded and use_cpu:
        raise UserError(
            "train.fsdp: FSDP shards over GPUs; on CPU processes accelerate would train plain DDP instead "
            "(set train.fsdp=false: DDP is what a CPU launch runs)"
        )
    if config and use_cpu:
        raise UserError(
            "train.deepspeed: DeepSpeed trains on GPUs; on CPU processes accelerate would train plain DDP instead "
            "(set train.deepspeed='' on CPU)"
        )
    return {**sharded, "deepspeed": config}


def deepspeed_config(value: str) -> str | None:
    """The DeepSpeed config file a recipe names: a path, or a shipped one by name (``zero2``,
    ``zero3``); None when off. DeepSpeed missing is a one-line error before anything loads."""
    if not value:
        return None
    if value in DEEPSPEED_CONFIGS:
        from m2pt_cli.recipes import folder

        path = folder() / "deepspeed" / f"{value}.json"
    else:
        path = Path(value)
        _read_json(value, "train.deepspeed")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"train.deepspeed: {quote(value)} needs DeepSpeed, which is not installed here "
            "(pip install deepspeed, on a machine with CUDA); or set train.deepspeed='' to train without it"
        )
    return str(path)
