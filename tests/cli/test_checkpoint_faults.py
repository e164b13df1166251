"""A full disk or a crash during a save never costs the run: checkpoints are whole or absent.

The full disk is a real one: a small tmpfs mounted by the test (CI runs as root), grown after the
failure as a user would free space. The crash is a real ``SIGKILL`` sent by the process to itself
while it writes a checkpoint's optimizer state.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from m2pt_cli import checkpoints
from tests.conftest import STEPS
from tests.helpers import REPO, adapter, m2pt

pytestmark = pytest.mark.slow  # runs killed and disks filled mid-save


@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB file system: room for the run's files and about two checkpoints of the tiny run."""
    folder = tmp_path / "disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "none", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def assert_only_whole_checkpoints(run):
    assert not (run / checkpoints.STAGING).exists()
    for folder in checkpoints.checkpoints(run):
        assert checkpoints.missing_file(folder) == "", folder


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root; CI runs as root, so CI runs it")
def test_full_disk_is_one_line_and_resume_after_freeing_space_ends_as_an_uninterrupted_run(
    train_recipe, finished_run, small_disk
):
    run = small_disk / "run"
    result = m2pt("train", train_recipe, "--output-dir", run, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    last = checkpoints.latest_checkpoint(run)
    assert last is not None and last.name != f"checkpoint-{STEPS}"  # the disk filled before the end
    assert f"in {run} (the disk is full;" in line and "KiB free" in line, line
    assert f"resume from {last.name} once there is room" in line, line
    assert_only_whole_checkpoints(run)

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    m2pt("train", train_recipe, "--resume", run)
    assert_only_whole_checkpoints(run)
    expected, got = adapter(finished_run), adapter(run)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


KILL_WHILE_SAVING = """
import os, signal, sys, torch
from m2pt_cli.cli import main
save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)
torch.save = save_then_die
sys.argv = ["m2pt", *sys.argv[1:]]
main()
"""


def test_a_save_killed_part_way_resumes_from_the_previous_checkpoint(train_recipe, finished_run, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(train_recipe), "--output-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *args], cwd=REPO, env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (run / checkpoints.STAGING / "checkpoint-4").is_dir()  # the torn save, where resume never looks
    assert checkpoints.latest_checkpoint(run).name == "checkpoint-2"
    assert not (run / "checkpoint-4").exists()

    m2pt("train", train_recipe, "--resume", run)
    assert_only_whole_checkpoints(run)
    expected, got = adapter(finished_run), adapter(run)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_resume_skips_a_torn_checkpoint_and_says_so(train_recipe, finished_run, tmp_path):
    """A checkpoint folder without its trainer state (an older m2pt's torn save) is never resumed from."""
    run = tmp_path / "run"
    m2pt("train", train_recipe, "train.max_steps=4", "--output-dir", run)
    torn = run / "checkpoint-6"
    torn.mkdir()
    (torn / "adapter.safetensors").write_bytes((run / "checkpoint-4" / "adapter.safetensors").read_bytes())
    result = m2pt("train", train_recipe, "train.max_steps=4", "--resume", run)
    assert f"skipping torn checkpoint {torn} (no m2pt_adapter.json)" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root; CI runs as root, so CI runs it")
def test_full_disk_during_eval_keeps_the_answered_samples_for_resume(finished_run, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "none", str(disk)], check=True)
    try:
        args = ("eval", "--bench", "demo", "--adapter", finished_run, "--limit", "40", "--batch-size", "4")
        result = m2pt(*args, "--output-dir", disk / "ev", check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert "samples answered so far are kept" in line and "--resume" in line, line
        kept = int(re.search(r"the (\d+) samples answered so far", line)[1])
        assert 0 < kept < 40 and kept % 4 == 0
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        m2pt(*args, "--output-dir", disk / "ev", "--resume")
        rows = (disk / "ev" / "samples-demo.jsonl").read_text().splitlines()
        assert len(rows) == 40
    finally:
        subprocess.run(["umount", str(disk)], check=True)
