"""One writer per folder (#37): train, eval, sweep and export hold a lock in the folder they write.

The second writer exits 2 with one line naming the folder, the holder's pid and command, and changes
nothing; a lock left by a dead process is taken over with one log line; a lock is released at a
normal exit and after an exception.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2pt_cli import locks
from m2pt_cli.errors import UserError
from tests.helpers import REPO, m2pt, refused, snapshot

HOLD = """
import sys, time
from pathlib import Path
from m2pt_cli import locks
with locks.hold(Path(sys.argv[1]), command=sys.argv[2] if len(sys.argv) > 2 else "m2pt holder-for-test"):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(folder: Path, *command: str) -> subprocess.Popen:
    """A real process holding ``folder``'s lock (as a running m2pt command would) until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), *command], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def held(tmp_path):
    """A folder (with a file of the user's in it) whose lock another live process holds."""
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    holder = start_holder(folder)
    yield folder, holder.pid
    holder.kill()
    holder.wait()


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "command",
    [
        lambda f, run, recipe: ("train", recipe, "--output-dir", f),
        lambda f, run, recipe: ("train", recipe, "--output-dir", f, "--overwrite"),
        lambda f, run, recipe: ("eval", "--bench", "demo", "--adapter", run, "--limit", "2", "--output-dir", f),
        lambda f, run, recipe: ("eval", "--bench", "demo", "--predictions", f / "x.jsonl", "--output-dir", f),
        lambda f, run, recipe: ("export", run, "--output", f),
        lambda f, run, recipe: ("export", run, "--output", f, "--overwrite", "--format", "hf"),
        lambda f, run, recipe: ("sweep", recipe, "--grid", "prompts.text.length=0,2", "--output-dir", f),
    ],
    ids=["train", "train-overwrite", "eval", "eval-predictions", "export", "export-overwrite", "sweep"],
)
def test_a_second_writer_is_refused_naming_the_holder(held, finished_run, train_recipe, command):
    folder, pid = held
    (folder / "x.jsonl").write_text('{"id": "0", "answer": "1", "prediction": "1"}\n')
    args = command(folder, finished_run, train_recipe)
    refused(args, folder, f"{folder}: in use by pid {pid}", "'m2pt holder-for-test'", "pass another folder")


@pytest.mark.bad_input
def test_resume_of_a_run_in_use_is_refused_and_changes_nothing(finished_run, train_recipe, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    holder = start_holder(run)
    try:
        refused(("train", train_recipe, "--resume", run), run, f"in use by pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # two real trainings
def test_two_real_trains_into_one_folder_one_wins(train_recipe, tmp_path):
    """Two `m2pt train` processes started together into one folder: one trains, the other exits 2
    naming the winner's pid, and the run holds one training (one "before" evaluation, steps once)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "m2pt_cli", "train", str(train_recipe), "--output-dir", str(run)]
    both = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)]
    both.append(
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    )
    outputs = [p.communicate(timeout=600) for p in both]
    codes = sorted(p.returncode for p in both)
    assert codes == [0, 2], [o[1][-2000:] for o in outputs]
    winner, loser = (0, 1) if both[0].returncode == 0 else (1, 0)
    lines = outputs[loser][1].strip().splitlines()
    assert len(lines) == 1, outputs[loser][1]
    assert f"{run}: in use by pid {both[winner].pid}" in lines[0] and "('m2pt train " in lines[0], lines[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("before_accuracy" in row for row in rows) == 1, rows  # one training, not two interleaved
    assert sum("train_runtime" in row for row in rows) == 1, rows
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps), steps
    assert (run / "adapter" / "m2pt_adapter.json").is_file()
    assert not (run / locks.LOCK_FILE).exists()  # released at the winner's normal exit


@pytest.mark.parametrize("how", ["record", "kill-9"])
def test_a_lock_left_by_a_dead_process_is_taken_over_with_one_line(finished_run, tmp_path, how):
    out = tmp_path / "export"
    if how == "record":  # a lock file whose holder ended without removing it
        out.mkdir()
        record = {"pid": dead_pid(), "host": os.uname().nodename, "command": "m2pt train gone"}
        (out / locks.LOCK_FILE).write_text(json.dumps(record))
        gone = record["pid"]
    else:  # a real holder killed with SIGKILL: no cleanup ran
        holder = start_holder(out)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        gone = holder.pid
        assert (out / locks.LOCK_FILE).is_file()
    result = m2pt("export", finished_run, "--output", out, process=True)
    taken = [line for line in result.stderr.splitlines() if "taking over the lock" in line]
    assert len(taken) == 1 and f"pid {gone}" in taken[0] and "is no longer running" in taken[0], result.stderr
    assert (out / "adapter.safetensors").is_file()
    assert not (out / locks.LOCK_FILE).exists()


@pytest.mark.slow  # trains a run
def test_the_lock_is_released_after_a_normal_exit_and_after_an_error(finished_run, train_recipe, tmp_path):
    out = tmp_path / "export"
    m2pt("export", finished_run, "--output", out)
    assert not (out / locks.LOCK_FILE).exists()
    m2pt("export", finished_run, "--output", out, "--overwrite")  # the folder is free again
    # a train that fails after taking the lock (layer 9 is checked against the model): nothing is left
    run = tmp_path / "run"
    result = m2pt("train", train_recipe, "prompts.text.layers=[0, 9]", "--output-dir", run, check=False)
    assert result.returncode == 2 and "layer 9 is out of range" in result.stderr, result.stderr
    assert not run.exists()
    m2pt("train", train_recipe, "train.max_steps=1", "--output-dir", run)  # and it is free
    assert not (run / locks.LOCK_FILE).exists()


def test_hold_releases_on_an_exception_and_counts_nested_holds(tmp_path):
    folder = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), locks.hold(folder):
        assert (folder / locks.LOCK_FILE).is_file()
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()  # made by hold, empty again: removed
    with locks.hold(folder):
        (folder / "kept.txt").write_text("x")
        with locks.hold(folder):  # this process already holds it (a sweep's in-process calls)
            pass
        assert (folder / locks.LOCK_FILE).is_file()  # the inner exit did not release it
        record = json.loads((folder / locks.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt"]


def test_only_rank_zero_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    with locks.hold(folder):
        assert not (folder / locks.LOCK_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    with locks.hold(folder):
        assert (folder / locks.LOCK_FILE).is_file()


@pytest.mark.bad_input
def test_a_lock_file_that_is_a_link_is_refused(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    (folder / locks.LOCK_FILE).symlink_to(target)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="is a symbolic link"):
        with locks.hold(folder):
            pass
    assert snapshot(tmp_path) == before and target.read_text() == "precious"


def test_the_holder_is_named_with_its_host_when_it_is_another(tmp_path):
    """A lock held over a shared file system by another machine names that machine."""
    folder = tmp_path / "shared"
    holder = start_holder(folder)
    try:
        record = json.loads((folder / locks.LOCK_FILE).read_text())
        assert record == {"pid": holder.pid, "host": os.uname().nodename, "command": "m2pt holder-for-test"}
        with pytest.raises(UserError) as refusal, locks.hold(folder):
            pass
        assert str(refusal.value).startswith(f"{folder}: in use by pid {holder.pid} ('m2pt holder-for-test')")
        started = time.monotonic()
    finally:
        holder.kill()
        holder.wait()
    with locks.hold(folder):  # free as soon as the holder is gone (the kernel dropped its lock)
        assert time.monotonic() - started < 60
    assert "on 'other-host'" in locks._holder({"pid": 7, "host": "other-host", "command": "m2pt eval"})


@pytest.mark.bad_input
def test_a_holder_with_a_very_long_command_is_still_named(tmp_path):
    folder = tmp_path / "long"
    holder = start_holder(folder, "m2pt train " + "x" * 20_000)
    try:
        with pytest.raises(UserError) as refusal, locks.hold(folder):
            pass
    finally:
        holder.kill()
        holder.wait()
    message = str(refusal.value)
    assert f"in use by pid {holder.pid} ('m2pt train xxx" in message and len(message) < 400, message
