"""What a bug report needs to know about the machine: versions, devices, caches (``m2pt env``).

Nothing here loads a model or imports a package it reports on, except torch for its devices:
package versions come from the installed distributions' metadata, so a broken install of one
package does not hide the others.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from m2pt_cli import __version__

# distribution name -> what users call it; the order is the report's.
PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "peft": "peft",
    "open_clip_torch": "open_clip",
    "datasets": "datasets",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "gguf": "gguf",
    "bitsandbytes": "bitsandbytes",
    "flash-attn": "flash-attn",
    "deepspeed": "deepspeed",
    "lmms_eval": "lmms-eval",
}
NOT_INSTALLED = "not installed"
# Environment variables that change what m2pt loads, where it writes, or which devices it sees.
VARIABLES = (
    "M2PT_CACHE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_CACHE",
    "CUDA_VISIBLE_DEVICES",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "ACCELERATE_MIXED_PRECISION",
)


def package_versions() -> dict[str, str]:
    """Each reported package's installed version, or ``"not installed"``."""
    versions = {}
    for distribution, shown in PACKAGES.items():
        try:
            versions[shown] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[shown] = NOT_INSTALLED
    return versions


def cudnn_version(number: int | None) -> str:
    """cuDNN's version number as ``major.minor.patch`` (9.x counts majors in 10,000s, 8.x in 1,000s)."""
    if not number:
        return "none"
    major_unit = 10_000 if number >= 90_000 else 1_000
    return f"{number // major_unit}.{number % major_unit // 100}.{number % 100}"


def torch_report() -> dict[str, Any]:
    """torch's build (CUDA, cuDNN), the devices it sees with their memory, and bf16 support."""
    import torch

    report: dict[str, Any] = {
        "cuda_build": torch.version.cuda or "none (CPU build)",
        "cudnn": cudnn_version(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "devices": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            report["devices"].append(
                {
                    "index": index,
                    "name": properties.name,
                    "memory_gib": round(properties.total_memory / 2**30, 1),
                    "capability": f"{properties.major}.{properties.minor}",
                }
            )
        report["bf16"] = bool(torch.cuda.is_bf16_supported())
    else:
        report["bf16"] = "CPU only (bf16 runs on CPU, slowly)"
    return report


def cache_folders() -> dict[str, str]:
    """Where downloads and conversions go: the Hugging Face caches and m2pt's own."""
    from huggingface_hub import constants

    from m2pt_cli.data import cache as data_cache
    from m2pt_cli.gguf_files import cache_root

    return {
        "huggingface_hub": str(constants.HF_HUB_CACHE),
        "datasets": os.environ.get("HF_DATASETS_CACHE") or str(os.path.join(constants.HF_HOME, "datasets")),
        "m2pt_gguf": str(cache_root()),
        "m2pt_data": str(data_cache.root()),
    }


def collect() -> dict[str, Any]:
    """The whole report as a JSON-ready dictionary."""
    return {
        "m2pt": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "torch": torch_report(),
        "caches": cache_folders(),
        "environment": {name: os.environ[name] for name in VARIABLES if name in os.environ},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned ``key: value`` lines for pasting into an issue."""
    lines = [f"m2pt: {report['m2pt']}", f"python: {report['python']} ({report['executable']})"]
    lines += [f"platform: {report['platform']}", f"cpu cores: {report['cpu_count']}", "packages:"]
    width = max(len(name) for name in report["packages"])
    lines += [f"  {name:<{width}}  {version}" for name, version in report["packages"].items()]
    torch_part = report["torch"]
    lines += [
        f"torch CUDA build: {torch_part['cuda_build']}",
        f"cuDNN: {torch_part['cudnn']}",
        f"torch CPU threads: {torch_part['cpu_threads']}",
    ]
    if torch_part["devices"]:
        lines.append("devices:")
        lines += [
            f"  cuda:{device['index']}  {device['name']}  {device['memory_gib']} GiB  "
            f"compute capability {device['capability']}"
            for device in torch_part["devices"]
        ]
    else:
        lines.append("devices: cpu only (torch sees no CUDA device)")
    lines.append(f"bf16: {torch_part['bf16']}")
    lines.append("caches:")
    lines += [f"  {name}: {folder}" for name, folder in report["caches"].items()]
    environment = report["environment"]
    lines.append("environment:" + ("" if environment else " (none of the variables m2pt reads is set)"))
    lines += [f"  {name}={value}" for name, value in environment.items()]
    return "\n".join(lines)
