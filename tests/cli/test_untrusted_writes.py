"""Adapters, recipes, predictions files and data from strangers never make m2pt write outside the
folder the user chose (issue #23, class 5).

Each case carries a payload that would leave something in ``tmp_path / "outside"`` if the write
happened: a file-derived name such as ``../../../outside/marker``, or a symbolic link planted in an
output folder that points there. Every case asserts that nothing appears there; the CLI cases also
assert a one-line error (exit 2) and an untouched chosen folder (``refused``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from m2pt_cli.errors import UserError, quote
from tests.helpers import refused, snapshot

LINKED = "is a symbolic link; m2pt does not write through links in an output folder"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the chosen one; the tests check that it stays exactly as it is."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def state(folder: Path) -> dict:
    """Content and folder modification times under ``folder``: a file made and renamed away still shows."""
    times = {str(p): p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")] if p.is_dir() and not p.is_symlink()}
    return {"content": snapshot(folder), "times": times}


# ----------------------------------------------------------------------------- names taken from files


@pytest.mark.bad_input
def test_an_mme_category_from_a_predictions_file_cannot_name_a_file_outside(tmp_path, outside):
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    rows = [
        {"id": "existence/0.png#0", "question_id": "existence/0.png", "question": "q", "prediction": "Yes"},
        {"id": "x/1.png#1", "question_id": "x/1.png", "question": "q", "prediction": "No"},
    ]
    rows[0].update(answer="Yes", category="existence")
    rows[1].update(answer="No", category="../../../outside/marker")  # chosen/ev/mme_results/ + this + .txt
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("eval", "--bench", "mme", "--predictions", predictions, "--output-dir", chosen / "ev")
    refused(args, chosen, "--predictions: line 2", "'../../../outside/marker' is not an MME subtask", "existence, ")
    assert list(outside.iterdir()) == [] and list(chosen.iterdir()) == []


def test_an_mme_category_from_the_data_is_refused_naming_the_sample(tmp_path, outside):
    from m2pt_cli.benches.mme import MME

    row = {"question_id": "x/1.png", "image": None, "question": "Is it?", "answer": "Yes"}
    with pytest.raises(UserError, match=r"sample x/1.png#3: category '\.\./\.\./outside/marker' is not an MME"):
        MME().to_sample({**row, "category": "../../outside/marker"}, 3, False)
    with pytest.raises(UserError, match="category None is not an MME subtask"):  # no category at all
        MME().to_sample(row, 0, False)
    assert MME().to_sample({**row, "category": "OCR"}, 0, False).extra["category"] == "OCR"

    # rows that reach the tool-format writer some other way (a resumed samples file) are checked there too
    folder = tmp_path / "ev"
    folder.mkdir()
    bad = {"id": "s1", "prediction": "Yes", "answer": "Yes", "correct": 1.0}
    bad["extra"] = {"category": "../../outside/marker", "image_key": "x/1.png", "original_question": "q"}
    with pytest.raises(UserError, match="sample 's1': category"):
        MME().write_extra([bad], folder)
    assert list(folder.iterdir()) == [] and list(outside.iterdir()) == []


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["override", "recipe"])
def test_a_recipe_name_cannot_place_a_run_outside_runs(train_recipe, tmp_path, outside, where):
    work = tmp_path / "work"  # runs/<name>-<time> is relative to the working folder
    work.mkdir()
    if where == "override":
        args = ("train", train_recipe, "train.max_steps=1", "name=../../outside/marker")
        needle = "name: '../../outside/marker' is not allowed"
    else:
        raw = yaml.safe_load(train_recipe.read_text())
        recipe = tmp_path / "stranger.yaml"
        recipe.write_text(yaml.safe_dump({**raw, "name": str(outside / "marker")}))
        args = ("train", recipe, "train.max_steps=1")
        needle = f"{recipe}: name: {quote(str(outside / 'marker'))} is not allowed"  # long paths cut short
    refused(args, work, needle, "plain folder name", cwd=work)
    assert list(outside.iterdir()) == [] and list(work.iterdir()) == []


@pytest.mark.bad_input
def test_a_recipe_name_cannot_place_a_sweep_outside_sweeps(train_recipe, tmp_path, outside):
    work = tmp_path / "work"  # sweeps/<name>-<time>
    work.mkdir()
    args = ("sweep", train_recipe, "name=../../outside/marker", "--grid", "train.max_steps=1")
    refused(args, work, "name: '../../outside/marker' is not allowed", cwd=work)
    assert list(outside.iterdir()) == [] and list(work.iterdir()) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "a\\b", "a\0b"])
def test_names_that_become_path_components_are_plain(train_recipe, name):
    from m2pt_cli import config
    from m2pt_cli.files import plain_name
    from m2pt_cli.sweep import cell_name

    with pytest.raises(UserError, match="it must be a plain folder name"):
        plain_name(name, "name")
    if name and "\0" not in name:  # an empty name falls back to the file's stem; YAML has no NUL
        with pytest.raises(UserError, match=r"name: .* is not allowed"):
            config.load(train_recipe, (f"name={name}",))
    # a sweep's cell folder comes from --grid values: always one plain component
    cell = cell_name([("name", name), ("prompts.text.length", "../../x")])
    assert plain_name(cell, "cell") == cell and "/" not in cell


# ----------------------------------------------------------------------------- links planted in output folders


def test_the_atomic_write_never_writes_through_a_planted_temporary_name(tmp_path, outside):
    from m2pt_cli.files import write_text_atomic

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".results.json.tmp").symlink_to(outside / "marker")  # the fixed name an older m2pt used
    write_text_atomic(folder / "results.json", "{}\n")
    assert (folder / "results.json").read_text() == "{}\n" and not (folder / "results.json").is_symlink()
    assert list(outside.iterdir()) == []
    (folder / "summary.json").symlink_to(outside / "marker")
    with pytest.raises(UserError, match=f"summary.json {LINKED}"):
        write_text_atomic(folder / "summary.json", "{}\n")
    assert list(outside.iterdir()) == []


def test_appends_and_log_files_refuse_a_planted_link(tmp_path, outside):
    from m2pt_cli.files import open_append
    from m2pt_cli.logs import close_file_logs, setup

    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("metrics.jsonl", "train.log"):
        (folder / name).symlink_to(outside / "marker")
    with pytest.raises(UserError, match=f"metrics.jsonl {LINKED}"):
        open_append(folder / "metrics.jsonl")
    try:
        with pytest.raises(UserError, match=f"train.log {LINKED}"):
            setup(folder / "train.log")
    finally:
        close_file_logs()
    assert list(outside.iterdir()) == []
    with open_append(folder / "new.jsonl") as handle:  # an ordinary append still works
        handle.write("{}\n")
    assert (folder / "new.jsonl").read_text() == "{}\n"


@pytest.fixture
def partial_run(finished_run, tmp_path) -> Path:
    """A copy of the tiny run stopped after its first checkpoint (step 2 of 8): resuming it trains on."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    for name in ("checkpoint-4", "checkpoint-6", "checkpoint-8", "adapter", "summary.json"):
        if (run / name).is_dir():
            shutil.rmtree(run / name)
        else:
            (run / name).unlink()
    return run


@pytest.mark.bad_input
@pytest.mark.parametrize("entry", ["train.log", "metrics.jsonl", ".checkpoint-staging", "checkpoint-4"])
def test_resuming_a_run_with_a_planted_link_is_refused_before_anything_is_written(
    partial_run, finished_run, train_recipe, outside, entry
):
    path, target = partial_run / entry, outside / entry
    if entry == ".checkpoint-staging":  # the Trainer would write the next checkpoint into it
        target.mkdir()
    elif entry == "checkpoint-4":  # the checkpoint the resumed run saves next
        shutil.copytree(finished_run / entry, target)
    elif path.exists():
        path.unlink()  # train.log and metrics.jsonl would be appended to through a dangling link
    path.symlink_to(target)
    before = state(outside)
    refused(("train", train_recipe, "--resume", partial_run), partial_run, f"{path} {LINKED}")
    assert state(outside) == before


@pytest.mark.bad_input
@pytest.mark.parametrize("entry", ["samples-demo.jsonl", "results.json"])
def test_eval_resume_into_a_folder_with_a_planted_link_is_refused(finished_run, tmp_path, outside, entry):
    folder = tmp_path / "ev"
    folder.mkdir()
    (folder / entry).symlink_to(outside / "marker")
    args = ("eval", "--bench", "demo", "--adapter", finished_run, "--limit", "1", "--output-dir", folder, "--resume")
    refused(args, folder, f"{folder / entry} {LINKED}")
    assert list(outside.iterdir()) == []


@pytest.mark.bad_input
def test_sweep_resume_into_a_folder_with_a_planted_link_is_refused(train_recipe, tmp_path, outside):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (outside / "cells").mkdir()
    (folder / "cells").symlink_to(outside / "cells")  # every cell's run and eval would go there
    args = ("sweep", train_recipe, "train.max_steps=1", "--grid", "prompts.text.length=2", "--output-dir", folder)
    before = state(outside)
    refused((*args, "--resume"), folder, f"{folder / 'cells'} {LINKED}")
    assert state(outside) == before


def metrics_run(folder: Path) -> Path:
    folder.mkdir()
    lines = [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)] + [{"step": 3, "after_accuracy": 0.5}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.mark.parametrize("planted", ["plots", "plots/.curves.tmp.png", "plots/curves.png"])
def test_plot_never_writes_through_a_planted_link(tmp_path, outside, planted):
    from m2pt_cli.plots import plot

    run = metrics_run(tmp_path / "run")
    (run / "plots").mkdir()
    if planted == "plots":
        (run / "plots").rmdir()
        (outside / "plots").mkdir()
        (run / "plots").symlink_to(outside / "plots")
    else:
        (run / planted).symlink_to(outside / "marker")
    before = state(outside)
    with pytest.raises(UserError, match=LINKED):
        plot(run)
    assert state(outside) == before
    assert plot(tmp_path / "run", output_dir=tmp_path / "mine")[0] == tmp_path / "mine" / "curves.png"


def test_attention_never_writes_through_a_planted_link(finished_run, tmp_path, outside):
    from m2pt_cli.attention import run as attention

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    (run / "attention.json").symlink_to(outside / "marker")  # written beside the default attention.png
    image = tmp_path / "digit.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    with pytest.raises(UserError, match=f"attention.json {LINKED}"):
        attention(run, image, "What digit is shown?", -1, None)
    assert list(outside.iterdir()) == [] and not (run / "attention.png").exists()


def test_a_users_own_output_folder_may_be_a_link(tmp_path):
    """Only links inside the tree are refused: --output-dir may name a link to scratch storage."""
    from m2pt_cli.evaluate import EvalSettings, rescore_file

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "out").symlink_to(scratch)
    row = {"id": "a#0", "question_id": "existence/a.png", "question": "q", "prediction": "Yes", "answer": "Yes"}
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(json.dumps({**row, "category": "existence"}) + "\n")
    rescore_file("mme", predictions, EvalSettings(), tmp_path / "out")
    assert (scratch / "results.json").is_file() and (scratch / "mme_results" / "existence.txt").is_file()


def test_writes_inside_a_linked_top_folder_still_refuse_links_below_it(tmp_path, outside):
    from m2pt_cli.files import make_folder, write_text_atomic

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    top = tmp_path / "top"
    top.symlink_to(scratch)
    (scratch / "cells").symlink_to(outside)
    with pytest.raises(UserError, match=f"{top / 'cells'} {LINKED}"):
        write_text_atomic(top / "cells" / "a" / "cell.json", "{}", root=top)
    with pytest.raises(UserError, match=LINKED):
        make_folder(top / "cells" / "a", root=top)
    assert list(outside.iterdir()) == []
