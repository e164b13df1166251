"""A command writes only its own files: export, train --overwrite and failed starts.

Each case snapshots the folder tree (paths and content hashes) before and after the real CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import m2pt, refused


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter.safetensors"))


def user_folder(root: Path) -> Path:
    folder = root / "deliverables"
    (folder / "figures").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "figures" / "plot.png").write_bytes(b"\x89PNG not really")
    return folder


@pytest.mark.bad_input
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_replaces_a_folder_holding_other_files(finished_run, tmp_path, overwrite):
    folder = user_folder(tmp_path)
    args = ("export", finished_run, "--output", folder, *(["--overwrite"] if overwrite else []))
    refused(args, folder, str(folder), "holds figures, which is not part of an m2pt adapter")


@pytest.mark.bad_input
def test_export_to_the_current_folder_is_refused_when_it_holds_files(finished_run, tmp_path):
    folder = user_folder(tmp_path)
    refused(("export", finished_run, "--output", "."), folder, "holds figures", cwd=folder)


def test_export_over_an_earlier_export_needs_overwrite_and_replaces_only_its_files(finished_run, tmp_path):
    out = tmp_path / "export"
    m2pt("export", finished_run, "--format", "hf", "--output", out)
    assert (out / "README.md").is_file()
    refused(("export", finished_run, "--output", out), out, "already holds an m2pt adapter", "--overwrite")
    other = finished_run / "checkpoint-2"
    m2pt("export", other, "--output", out, "--overwrite")  # a safetensors export of another adapter
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "m2pt_adapter.json", "recipe.yaml"]
    exported, source = adapter_tensors(out), adapter_tensors(other)
    assert set(exported) == set(source) and all(torch.equal(exported[k], source[k]) for k in source)
    (out / "mine.txt").write_text("x")  # now it holds a file that is not the adapter's
    refused(("export", finished_run, "--output", out, "--overwrite"), out, "holds mine.txt")


def test_export_into_an_empty_folder(finished_run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    m2pt("export", finished_run, "--output", out)
    assert (out / "m2pt_adapter.json").is_file()


@pytest.mark.bad_input
def test_train_overwrite_refuses_a_run_folder_holding_a_users_file(finished_run, train_recipe, tmp_path):
    run = tmp_path / "run"
    m2pt("train", train_recipe, "train.max_steps=1", "train.save_steps=1", "--output-dir", run)
    (run / "notes.txt").write_text("mine")
    args = ("train", train_recipe, "train.max_steps=1", "--output-dir", run, "--overwrite")
    refused(args, run, "holds notes.txt, which m2pt did not write")


@pytest.mark.bad_input
def test_train_into_a_folder_of_other_files_is_refused(train_recipe, tmp_path):
    folder = user_folder(tmp_path)
    refused(("train", train_recipe, "--output-dir", folder), folder, "a new run needs a new or empty folder")


@pytest.mark.bad_input
def test_a_refused_start_leaves_nothing_and_the_same_command_then_runs(train_recipe, tmp_path):
    run = tmp_path / "run"
    bad = ("train", train_recipe, "train.max_steps=1", "model.name_or_path=" + str(tmp_path / "no-such-model"))
    result = m2pt(*bad, "--output-dir", run, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not run.exists()  # no half-made run folder to block the rerun
    m2pt("train", train_recipe, "train.max_steps=1", "--output-dir", run)  # the fixed command, no --overwrite
    assert (run / "adapter" / "m2pt_adapter.json").is_file()


def test_a_folder_left_by_a_killed_start_is_not_a_run_to_protect(train_recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")  # what a start killed before its first checkpoint leaves
    (run / "train.log").write_text("")
    m2pt("train", train_recipe, "train.max_steps=1", "--output-dir", run)
    assert (run / "adapter").is_dir()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted read-only; CI runs as root)."""
    import os
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:  # permissions stop a normal user as a read-only mount would
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "none", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.bad_input
def test_output_on_a_read_only_file_system_is_one_line(finished_run, train_recipe, read_only_folder):
    commands = {
        "export": ("export", finished_run, "--output", read_only_folder / "out"),
        "train": ("train", train_recipe, "train.max_steps=1", "--output-dir", read_only_folder / "run"),
        "eval": (
            "eval",
            "--bench",
            "demo",
            "--adapter",
            finished_run,
            "--limit",
            "1",
            "--output-dir",
            read_only_folder / "ev",
        ),
    }
    for name, args in commands.items():
        result = m2pt(*args, check=False)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"m2pt: error: {read_only_folder}") and "Traceback" not in result.stderr, (name, line)
    assert list(read_only_folder.iterdir()) == []
