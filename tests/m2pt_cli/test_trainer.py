"""Training through the real CLI: run folder, adapter-only checkpoints, exact resume, DDP, baselines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.conftest import REPO, STEPS
from tests.helpers import adapter, m2pt, snapshot


def test_run_folder_holds_recipe_logs_checkpoints_and_adapter(finished_run, train_recipe):
    run = finished_run
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == STEPS
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "loss" in e] == list(range(1, STEPS + 1))
    assert any("after_accuracy" in e for e in lines) and any("before_accuracy" in e for e in lines)
    checkpoints = sorted(p.name for p in run.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{s}" for s in range(2, STEPS + 1, 2)]
    files = {p.name for p in (run / f"checkpoint-{STEPS}").iterdir()}
    assert {"adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # never base weights
    state = adapter(run)
    assert set(state) == {
        "vision_prompts",
        "text_prompts",
        "projector.linear_1.weight",
        "projector.linear_1.bias",
        "projector.linear_2.weight",
        "projector.linear_2.bias",
    }
    size = (run / "adapter" / "adapter.safetensors").stat().st_size
    assert size <= sum(t.numel() for t in state.values()) * 4 + 64 * 1024
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["data"]["held_out"] == 16 and summary["data"]["train"] == 80
    assert 0.0 <= summary["held_out_accuracy_after"] <= 1.0


def test_trained_tensors_move_and_base_stays(finished_run, tiny_llava_dir):
    import m2pt_cli

    model, _ = m2pt_cli.load(finished_run / "config.yaml")
    fresh = model.adapter_state_dict()
    trained = adapter(finished_run)
    for key in trained:
        assert not torch.equal(trained[key], fresh[key]), key
    assert (tiny_llava_dir / "model.safetensors").stat().st_mtime < (finished_run / "config.yaml").stat().st_mtime


@pytest.mark.slow  # a real process killed with SIGKILL
def test_resume_after_kill_matches_an_uninterrupted_run(finished_run, train_recipe, tmp_path):
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2pt_cli", "train", str(train_recipe), "--output-dir", str(run)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter").exists(), "killed too late: the run finished"
    result = m2pt("train", train_recipe, "--resume", run)
    assert "done: 8 steps" in result.stdout
    resumed, straight = adapter(run), adapter(finished_run)
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], atol=1e-6, rtol=0), key


def test_resume_refuses_another_recipe(finished_run, train_recipe):
    result = m2pt("train", train_recipe, "train.learning_rate=0.1", "--resume", finished_run, check=False)
    assert result.returncode == 2
    assert "differs from the run's config.yaml at train.learning_rate" in result.stderr


def test_resuming_a_finished_run_trains_and_writes_nothing(finished_run, train_recipe, tmp_path):
    """At its last step a run is done: no step past max_steps, no checkpoint of one, nothing rewritten."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    result = m2pt("train", train_recipe, "--resume", run)
    assert f"already finished: step {STEPS} is the last" in result.stdout
    assert snapshot(run) == before


def test_resuming_at_the_last_checkpoint_writes_only_the_adapter_and_summary(finished_run, train_recipe, tmp_path):
    """Killed after its last checkpoint, before its adapter: resume trains no step past the end."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    result = m2pt("train", train_recipe, "--resume", run)
    assert f"checkpoint-{STEPS} is the run's last step: nothing to train" in result.stderr
    assert sorted(p.name for p in run.glob("checkpoint-*")) == sorted(p.name for p in finished_run.glob("checkpoint-*"))
    resumed, straight = adapter(run), adapter(finished_run)
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)
    summary, first = (json.loads((r / "summary.json").read_text()) for r in (run, finished_run))
    assert summary["steps"] == STEPS
    assert summary["held_out_accuracy_before"] == first["held_out_accuracy_before"] is not None


def test_a_resumed_run_keeps_the_accuracy_before_training(finished_run, train_recipe, tmp_path):
    """Measured once at step 0 by the first run; the resumed run's summary.json still has it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for folder in [*run.glob("checkpoint-*"), run / "adapter"]:
        if folder.name not in ("checkpoint-2", "checkpoint-4"):
            shutil.rmtree(folder)
    (run / "summary.json").unlink()
    result = m2pt("train", train_recipe, "--resume", run)
    assert f"done: {STEPS} steps" in result.stdout and "n/a before" not in result.stdout
    summary, first = (json.loads((r / "summary.json").read_text()) for r in (run, finished_run))
    assert summary["held_out_accuracy_before"] == first["held_out_accuracy_before"] is not None


def test_output_dir_holding_a_run_is_refused(finished_run, train_recipe):
    result = m2pt("train", train_recipe, "--output-dir", finished_run, check=False)
    assert result.returncode == 2 and "already holds a run" in result.stderr


@pytest.mark.slow  # torchrun: two processes
def test_two_process_ddp_matches_one_process(train_recipe, finished_run, tmp_path):
    """torchrun, 2 CPU processes x 4 samples = one process x 8 samples.

    Tolerance 1e-5: the all-reduce sums two half-batch gradients where one process sums one batch,
    so float32 results differ by rounding (~1e-7 relative per step) that Adam's step carries over
    8 steps; a wrong batch split or loss normalisation moves the tensors by 1e-3 or more.
    """
    run = tmp_path / "ddp"
    cache = tmp_path / "cache"  # empty: the data is encoded in this launch, once
    env = {**os.environ, "OMP_NUM_THREADS": "1", "M2PT_CACHE": str(cache)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "m2pt_cli",
        "train",
        str(train_recipe),
        "train.per_device_batch_size=4",
        "--output-dir",
        str(run),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 8 steps") == 1  # rank 0 reports
    # rank 0 encoded while rank 1 waited (main_process_first), then rank 1 read its entry: a rank that
    # encodes too says so (a warning, printed on every rank)
    assert result.stderr.count("records encoded in") == 1 and "is encoding it too" not in result.stderr
    assert [p.name for p in (cache / "data").iterdir() if ".partial-" in p.name] == []
    single = adapter(finished_run)
    ddp = adapter(run)
    for key in single:
        assert torch.allclose(ddp[key], single[key], atol=1e-5, rtol=0), (key, (ddp[key] - single[key]).abs().max())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_train_and_save(train_recipe, tmp_path, method):
    import m2pt_cli

    run = tmp_path / method
    m2pt("train", train_recipe, f"method={method}", "train.max_steps=2", "--output-dir", run)
    state = adapter(run)
    meta = json.loads((run / "adapter" / "m2pt_adapter.json").read_text())
    assert meta["method"] == method
    assert state["vision_prompts"].numel() == 0 and state["text_prompts"].numel() == 0
    if method == "lora":
        lora = [k for k in state if "lora_" in k]
        assert lora and all("language_model" in k and (".q_proj." in k or ".v_proj." in k) for k in lora)
        assert not any("vision_tower" in k for k in state)
        untrained = m2pt_cli.load(train_recipe).model.adapter_state_dict()
        for key in (k for k in state if k.startswith("projector.")):  # trains beside LoRA
            assert not torch.equal(state[key], untrained[key]), key
    else:
        assert any(k.startswith("language_model.layers.0.") for k in state)
    assert any(k.startswith("projector.") for k in state)


@pytest.mark.slow
def test_demo_recipe_reaches_five_times_chance(tmp_path):
    """The README's main job: held-out answer accuracy (generated, 10 classes) >= 50 % after training."""
    started = time.time()
    result = m2pt("train", REPO / "recipes" / "demo.yaml", "--output-dir", tmp_path / "demo")
    seconds = time.time() - started
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    print(result.stdout[-500:], f"wall {seconds:.0f} s")
    assert summary["held_out_accuracy_after"] >= 0.5
    assert summary["held_out_accuracy_before"] < 0.2
    assert summary["data"]["held_out"] == 200
