"""The device a command runs on when ``--device`` is not given, and ``--device`` checked."""

from __future__ import annotations

import pytest
import torch

from m2pt_cli import devices
from m2pt_cli.errors import UserError


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
