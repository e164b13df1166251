"""Which device a command runs on: ``--device`` when given, else what the machine has."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import click

from m2pt_cli.errors import UserError

HELP = (
    "cpu, cuda, cuda:1, ... (default: the launcher's GPU under torchrun/accelerate, else CUDA when available, else cpu)"
)


def device_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--device`` option every model command shares (None: ``resolve`` picks)."""
    return click.option("--device", default=None, help=HELP)(command)


def default_device() -> str:
    """The launcher's GPU (``LOCAL_RANK`` under torchrun or accelerate), else ``cuda``, else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(local_rank)}" if local_rank and local_rank.isdigit() else "cuda"


def resolve(device: str | None) -> str:
    """``device`` checked (a name torch knows, a CUDA device only where there is one), or the default."""
    import torch

    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device on this machine (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def require_attention(implementation: str, dtype: str, device: str) -> None:
    """Refuse an attention kernel that cannot run here, before any weights load: flash_attention_2
    needs a CUDA device, half-precision weights and the flash-attn package (transformers would
    otherwise fail after reading the config, as an ImportError or a dtype error)."""
    if implementation != "flash_attention_2":
        return
    key = "model.attn_implementation: flash_attention_2"
    if not device.startswith("cuda"):
        raise UserError(f"{key} runs on CUDA GPUs only, not on {device}; use sdpa (the default) or eager")
    if dtype not in ("bfloat16", "float16"):
        raise UserError(f"{key} needs model.dtype bfloat16 or float16, not {dtype}; or use sdpa (the default)")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            f"{key} needs the flash-attn package (pip install flash-attn --no-build-isolation); "
            "or use sdpa (the default)"
        )


def require_compiler(torch_compile: bool, device: str) -> None:
    """Refuse ``train.torch_compile`` on a CPU without a C++ compiler, before any weights load: inductor
    compiles CPU kernels with ``$CXX`` (default g++) and would otherwise fail at the first step."""
    import shutil

    if not torch_compile or device.startswith("cuda"):
        return
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise UserError(
            f"train.torch_compile: true on {device} needs a C++ compiler (inductor runs {compiler!r}, set by $CXX, "
            "and it is not on PATH): install g++ or set train.torch_compile=false"
        )
