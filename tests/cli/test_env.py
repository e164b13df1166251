"""``m2pt env``: the report a bug report pastes, checked against what is installed here."""

from __future__ import annotations

import json
from importlib import metadata

import torch

from m2pt_cli.environment import cudnn_version
from tests.helpers import m2pt


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def test_env_json_reports_installed_versions_devices_and_caches(tmp_path):
    env = {"M2PT_CACHE": str(tmp_path / "cache")}
    report = json.loads(m2pt("env", "--json", env=env).stdout)
    import transformers

    assert report["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["packages"]["transformers"] == transformers.__version__
    assert report["packages"]["deepspeed"] == _installed("deepspeed")
    assert report["packages"]["lmms-eval"] == _installed("lmms_eval")
    assert report["torch"]["cuda_available"] is torch.cuda.is_available()
    assert len(report["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["caches"]["m2pt_gguf"] == str(tmp_path / "cache" / "gguf")
    assert report["caches"]["m2pt_data"] == str(tmp_path / "cache" / "data")
    assert report["environment"]["M2PT_CACHE"] == str(tmp_path / "cache")


def test_env_text_is_one_report_with_every_package():
    result = m2pt("env")
    assert result.returncode == 0 and result.stderr == ""
    for name in (
        "torch",
        "transformers",
        "peft",
        "open_clip",
        "datasets",
        "accelerate",
        "bitsandbytes",
        "flash-attn",
        "deepspeed",
        "lmms-eval",
    ):
        assert any(line.split()[:1] == [name] for line in result.stdout.splitlines()), name
    assert "bf16:" in result.stdout and "caches:" in result.stdout


def test_cudnn_version_numbers():
    assert cudnn_version(92400) == "9.24.0"
    assert cudnn_version(90100) == "9.1.0"
    assert cudnn_version(8907) == "8.9.7"
    assert cudnn_version(None) == "none"
