"""The device a command runs on when ``--device`` is not given, and ``--device`` checked."""

from __future__ import annotations

import re

import pytest
import torch

from m2pt_cli import devices
from m2pt_cli.errors import UserError
from tests.helpers import m2pt


@pytest.mark.parametrize(
    ("cuda", "local_rank", "expected"),
    [(False, None, "cpu"), (False, "1", "cpu"), (True, None, "cuda"), (True, "1", "cuda:1"), (True, "0", "cuda:0")],
)
def test_default_is_the_launchers_gpu_else_cuda_else_cpu(monkeypatch, cuda, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert devices.resolve(None) == expected


def test_a_given_device_is_kept_and_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("cpu") == "cpu"
    with pytest.raises(UserError, match="--device 'gpu0': not a device name"):
        devices.resolve("gpu0")
    with pytest.raises(UserError, match="--device cuda: no CUDA device on this machine"):
        devices.resolve("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match="--device cuda:2: this machine has 2 CUDA device"):
        devices.resolve("cuda:2")


@pytest.mark.parametrize("command", ["train", "eval", "generate", "bench", "sweep", "attention"])
def test_every_model_command_says_its_default_device(command):
    from click.testing import CliRunner

    from m2pt_cli.cli import cli

    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--device" in result.output and "else CUDA when available" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("device", "dtype", "needle"),
    [
        ("cpu", "bfloat16", "runs on CUDA GPUs only, not on cpu"),
        ("cuda:0", "float32", "needs model.dtype bfloat16 or float16, not float32"),
    ],
)
def test_flash_attention_where_it_cannot_run_is_one_line(device, dtype, needle):
    from m2pt_cli.devices import require_attention
    from m2pt_cli.errors import UserError

    with pytest.raises(UserError, match=re.escape(needle)):
        require_attention("flash_attention_2", dtype, device)
    require_attention("sdpa", dtype, device)  # the others run anywhere
    require_attention("eager", dtype, device)


def test_flash_attention_without_its_package_names_it(monkeypatch):
    import importlib.util

    from m2pt_cli.devices import require_attention
    from m2pt_cli.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(UserError, match="needs the flash-attn package"):
        require_attention("flash_attention_2", "bfloat16", "cuda")


def test_train_with_flash_attention_on_cpu_stops_before_loading(tmp_path):
    out = tmp_path / "run"
    result = m2pt("train", "demo", "model.attn_implementation=flash_attention_2", "--output-dir", out, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("m2pt: ")]
    assert len(lines) == 1 and "flash_attention_2 runs on CUDA GPUs only" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_torch_compile_on_cpu_without_a_compiler_stops_before_loading(tmp_path, monkeypatch):
    """Inductor compiles CPU kernels with ``$CXX`` (g++): without it, one line before anything loads."""
    devices.require_compiler(True, "cpu")  # g++ is here
    devices.require_compiler(False, "cpu")
    monkeypatch.setenv("CXX", "no-such-compiler-m2pt")
    devices.require_compiler(True, "cuda")  # not checked for a GPU (inductor writes Triton kernels there)
    devices.require_compiler(False, "cpu")  # nothing to compile
    out = tmp_path / "run"
    result = m2pt("train", "demo", "train.torch_compile=true", "--output-dir", out, "--device", "cpu", check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("m2pt: ")]
    assert len(lines) == 1 and "needs a C++ compiler (inductor runs 'no-such-compiler-m2pt'" in lines[0], lines
    assert "Traceback" not in result.stderr and not out.exists()
