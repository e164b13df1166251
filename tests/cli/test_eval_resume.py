"""``--resume`` continues only the same work: one model, one set of settings, one sweep.

Adapter A is the tiny run's final adapter, adapter B its checkpoint after 2 steps (the same base
and recipe, other trained tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_sweep import FAST
from tests.helpers import REPO, m2pt, refused

DEMO = ("eval", "--bench", "demo", "--batch-size", "4")


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples-demo.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def half_eval(finished_run, tmp_path_factory) -> Path:
    """Adapter A's answers to the first 6 demo samples."""
    out = tmp_path_factory.mktemp("resume") / "ev"
    m2pt(*DEMO, "--adapter", finished_run, "--limit", "6", "--output-dir", out)
    return out


@pytest.mark.bad_input
def test_resume_with_another_adapter_is_refused(half_eval, finished_run):
    other = finished_run / "checkpoint-2"
    args = (*DEMO, "--adapter", other, "--limit", "12", "--output-dir", half_eval, "--resume")
    refused(args, half_eval, "belongs to another evaluation", "adapter_sha256 was", "--overwrite")


@pytest.mark.bad_input
def test_resume_with_other_decoding_is_refused(half_eval, finished_run):
    args = (*DEMO, "--adapter", finished_run, "--limit", "12", "--max-new-tokens", "2", "--output-dir", half_eval)
    refused((*args, "--resume"), half_eval, "max_new_tokens was 4, now 2")


@pytest.mark.bad_input
def test_resume_is_checked_from_the_rows_when_results_json_is_lost(half_eval, finished_run, tmp_path):
    folder = tmp_path / "ev"
    folder.mkdir()
    (folder / "samples-demo.jsonl").write_bytes((half_eval / "samples-demo.jsonl").read_bytes())
    args = (*DEMO, "--adapter", finished_run / "checkpoint-2", "--limit", "12", "--output-dir", folder, "--resume")
    refused(args, folder, "samples-demo.jsonl (line 1) belongs to another evaluation", "adapter_sha256")


@pytest.mark.bad_input
def test_a_folder_holding_an_evaluation_needs_resume_or_overwrite(half_eval, finished_run, tmp_path):
    args = (*DEMO, "--adapter", finished_run / "checkpoint-2", "--limit", "2", "--output-dir", half_eval)
    refused(args, half_eval, "already holds an evaluation", "--resume continues it, --overwrite replaces it")
    refused((*args, "--resume", "--overwrite"), half_eval, "pass one")

    folder = tmp_path / "mine"
    folder.mkdir()
    for path in half_eval.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("mine")
    m2pt(*args[:-1], folder, "--overwrite")
    assert (folder / "notes.txt").read_text() == "mine"  # only the evaluation's own files are replaced
    assert len(rows(folder)) == 2


def test_a_matching_resume_continues_and_scores_as_one_run(half_eval, finished_run, tmp_path):
    folder = tmp_path / "continued"
    folder.mkdir()
    for path in half_eval.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    m2pt(*DEMO, "--adapter", finished_run, "--limit", "12", "--output-dir", folder, "--resume")
    whole = tmp_path / "whole"
    m2pt(*DEMO, "--adapter", finished_run, "--limit", "12", "--output-dir", whole)
    assert rows(folder)[:6] == rows(half_eval)  # the first 6 were kept, not answered again
    assert [r["prediction"] for r in rows(folder)] == [r["prediction"] for r in rows(whole)]
    scores = [json.loads((f / "results.json").read_text())["metrics"] for f in (folder, whole)]
    assert scores[0] == scores[1]


@pytest.mark.bad_input
def test_sweep_resume_with_a_changed_grid_is_refused(tmp_path):
    out = tmp_path / "s"
    args = ("sweep", REPO / "recipes" / "demo.yaml", *FAST, "--output-dir", out)
    m2pt(*args, "--grid", "prompts.text.length=0")
    grown = (*args, "--grid", "prompts.text.length=0,2", "--resume")
    refused(grown, out, "belongs to another sweep", "grid[0][1] had 1 items, now 2")
    changed = (*args, "train.learning_rate=0.5", "--grid", "prompts.text.length=0", "--resume")
    refused(changed, out, 'overrides had 4 items, now 5 (new: "train.learning_rate=0.5")')
    refused((*args, "--grid", "prompts.text.length=0"), out, "already holds a sweep", "--resume continues it")
    result = m2pt(*args, "--grid", "prompts.text.length=0", "--resume")
    assert result.stderr.count("done, skipped") == 1
