"""``m2pt sweep``, ``m2pt plot`` and ``m2pt attention`` on the demo recipe and the tiny run."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, m2pt

pytestmark = pytest.mark.slow  # sweeps train a run per cell

FAST = ("train.max_steps=3", "train.eval_samples=8", "train.logging_steps=1", "train.save_steps=3")
# the 2 x 2 prompt-length sweep, up to its --output-dir value
LENGTH_SWEEP = (
    "sweep",
    REPO / "recipes" / "demo.yaml",
    *FAST,
    "--grid",
    "prompts.text.length=0,2",
    "--grid",
    "prompts.vision.length=0,2",
    "--bench",
    "demo",
    "--output-dir",
)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "lengths"
    m2pt(
        *LENGTH_SWEEP,
        out,
    )
    return out


def test_sweep_writes_one_row_per_cell(sweep_dir):
    rows = list(csv.DictReader((sweep_dir / "table.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {(r["prompts.text.length"], r["prompts.vision.length"]) for r in rows} == {
        ("0", "0"),
        ("0", "2"),
        ("2", "0"),
        ("2", "2"),
    }
    table = json.loads((sweep_dir / "table.json").read_text())
    for row in table:
        assert 0 <= row["demo/demo_accuracy"] <= 100 and row["wall_seconds"] > 0
    by_cell = {(r["prompts.text.length"], r["prompts.vision.length"]): r for r in table}
    projector = 64 * 128 + 128 + 128 * 128 + 128
    assert by_cell[("0", "0")]["trainable_parameters"] == projector
    assert by_cell[("2", "2")]["trainable_parameters"] == projector + 4 * 2 * 128 + 3 * 2 * 64


def test_every_accuracy_of_the_table_is_in_percent_and_the_held_out_column_says_so(sweep_dir, tmp_path):
    """The held-out accuracy (a share in summary.json) is in percent, as the bench metrics are; a
    resumed sweep turns an older m2pt's share column into the percent one."""
    header = next(csv.reader((sweep_dir / "table.csv").open()))
    assert "held_out_accuracy_percent" in header and "held_out_accuracy" not in header
    for cell in sorted((sweep_dir / "cells").iterdir()):
        row = json.loads((cell / "cell.json").read_text())
        share = json.loads((cell / "run" / "summary.json").read_text())["held_out_accuracy_after"]
        assert row["held_out_accuracy_percent"] == pytest.approx(100 * share)
        assert 0 <= row["held_out_accuracy_percent"] <= 100 and 0 <= row["demo/demo_accuracy"] <= 100
    older = tmp_path / "older"
    shutil.copytree(sweep_dir, older)
    cell = sorted((older / "cells").glob("*/cell.json"))[0]
    row = json.loads(cell.read_text())
    row = {("held_out_accuracy" if k == "held_out_accuracy_percent" else k): v for k, v in row.items()}
    row["held_out_accuracy"] = 0.0625
    cell.write_text(json.dumps(row))
    m2pt(*LENGTH_SWEEP, older, "--resume")
    table = json.loads((older / "table.json").read_text())
    assert all("held_out_accuracy" not in r for r in table)
    assert [
        r["held_out_accuracy_percent"]
        for r in table
        if r["prompts.text.length"] == row["prompts.text.length"]
        and r["prompts.vision.length"] == row["prompts.vision.length"]
    ] == [6.25]


def test_plot_of_a_sweep_without_benches_shows_the_held_out_accuracy(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    spec = {"name": "demo", "grid": [["prompts.text.length", ["0", "2"]]], "benches": []}
    (folder / "sweep.json").write_text(json.dumps(spec))
    rows = [
        {"prompts.text.length": "0", "status": "ok", "held_out_accuracy_percent": 6.25},
        {"prompts.text.length": "2", "status": "ok", "held_out_accuracy_percent": 50.0},
    ]
    (folder / "table.json").write_text(json.dumps(rows))
    result = m2pt("plot", folder)
    assert result.stdout.split() == [str(folder / "plots" / "bars_held_out_accuracy_percent.png")]
    _png_ok(result.stdout.strip())


def test_resume_skips_finished_cells(sweep_dir):
    stamps = {p: p.stat().st_mtime for p in sweep_dir.glob("cells/*/cell.json")}
    result = m2pt(
        *LENGTH_SWEEP,
        sweep_dir,
        "--resume",
    )
    assert result.stderr.count("done, skipped") == 4
    assert all(p.stat().st_mtime == t for p, t in stamps.items())


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sweep"
    result = m2pt(
        "sweep", REPO / "recipes" / "demo.yaml", *FAST, "--grid", "prompts.text.length=2,-1", "--output-dir", out
    )
    rows = json.loads((out / "table.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "prompts.text.length: must be 0 or more, got -1" in rows[1]["error"]
    assert "1 cells done, 1 failed" in result.stdout


def test_print_commands(tmp_path):
    result = m2pt(
        "sweep",
        REPO / "recipes" / "demo.yaml",
        "--grid",
        "method=m2pt,lora,full",
        "--bench",
        "demo",
        "--output-dir",
        tmp_path / "s",
        "--print-commands",
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(
        line.startswith("m2pt train ") and " && m2pt eval --bench demo" in line for line in lines
    )
    assert "method=lora" in lines[1] and not (tmp_path / "s").exists()


def test_cells_beside_the_grid_each_train_their_own_recipe(tmp_path):
    """--cell adds cells after the grid's, each with its own overrides (a baseline with its own
    learning rate beside a prompt-length grid); the table and the bar plot have one entry per cell."""
    out = tmp_path / "cells"
    args = (
        "sweep",
        REPO / "recipes" / "demo.yaml",
        *FAST,
        "--grid",
        "prompts.text.length=0,2",
        "--cell",
        "method=lora",
        "--cell",
        "method=full 'train.learning_rate=1e-4'",
        "--output-dir",
        out,
    )
    printed = m2pt(*args, "--print-commands").stdout.strip().splitlines()
    assert len(printed) == 4 and "method=full train.learning_rate=1e-4" in printed[3]
    m2pt(*args)
    rows = json.loads((out / "table.json").read_text())
    assert [r["cell"] for r in rows] == [
        "text.length=0",
        "text.length=2",
        "method=lora",
        "method=full__train.learning_rate=1e-4",
    ]
    assert all(r["status"] == "ok" for r in rows)
    import yaml

    recipes = {r["cell"]: yaml.safe_load((out / "cells" / r["cell"] / "run" / "config.yaml").read_text()) for r in rows}
    assert [recipes[c]["method"] for c in recipes] == ["m2pt", "m2pt", "lora", "full"]
    assert [recipes[c]["prompts"]["text"]["length"] for c in list(recipes)[:2]] == [0, 2]
    learning_rates = [recipes[c]["train"]["learning_rate"] for c in recipes]
    assert learning_rates[3] == 1e-4 and learning_rates[2] == learning_rates[0] != 1e-4
    plotted = m2pt("plot", out, "--metric", "held_out_accuracy_percent").stdout.split()
    assert any(p.endswith("bars_held_out_accuracy_percent.png") for p in plotted)
    for path in plotted:
        _png_ok(path)
    again = m2pt(*args, "--resume")
    assert again.stderr.count("done, skipped") == 4
    changed = m2pt(*args[:-2], "--cell", "seed=9", "--output-dir", out, "--resume", check=False)
    assert changed.returncode == 2 and "cells" in changed.stderr


def test_resume_collects_cells_run_from_printed_commands(tmp_path):
    import shlex

    out = tmp_path / "printed"
    args = ("sweep", REPO / "recipes" / "demo.yaml", *FAST, "--grid", "prompts.text.length=0,2", "--output-dir", out)
    lines = m2pt(*args, "--print-commands").stdout.strip().splitlines()
    first = shlex.split(lines[0])  # run one cell the way a scheduler would
    assert first[:2] == ["m2pt", "train"]
    m2pt(*first[1:])
    summary = out / "cells" / "text.length=0" / "run" / "summary.json"
    stamp = summary.stat().st_mtime
    result = m2pt(*args, "--resume")
    assert result.stderr.count("done, skipped") == 1  # collected, not trained again
    assert summary.stat().st_mtime == stamp
    rows = json.loads((out / "table.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok"]


def _png_ok(path, size=(640, 480)):
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert Image.open(path).size == size
    assert image.std() > 5  # not blank


def test_plot_heatmap_and_curves(sweep_dir):
    result = m2pt("plot", sweep_dir)
    paths = result.stdout.split()
    assert any("heatmap_demo_demo_accuracy.png" in p for p in paths) and any("curves.png" in p for p in paths)
    for path in paths:
        _png_ok(path)


def test_plot_of_a_run(finished_run, tmp_path):
    result = m2pt("plot", finished_run, "--output-dir", tmp_path)
    _png_ok(result.stdout.strip())


def test_attention_shares_sum_to_one_and_follow_the_prompts(finished_run, tmp_path):
    import m2pt_cli
    from m2pt_cli.attention import shares
    from m2pt_cli.registry import BACKBONES

    model, processor = m2pt_cli.load(finished_run, overrides=("model.attn_implementation=eager",))
    backbone = BACKBONES.get("llava")
    image = Image.new("RGB", (32, 32), "white")
    first = shares(model, processor, backbone, "processor", image, "What digit is shown?")
    for head in range(len(first["vision"]["prompt_share"])):
        assert first["vision"]["prompt_share"][head] + first["vision"]["other_share"][head] == pytest.approx(
            1, abs=1e-5
        )
    for head in range(len(first["text"]["prompt_share"])):
        total = sum(first["text"][k][head] for k in ("prompt_share", "image_share", "text_share"))
        assert total == pytest.approx(1, abs=1e-5)
    assert all(s > 0 for s in first["text"]["prompt_share"])
    with torch.no_grad():  # new prompt directions (scaling alone would be undone by the layer norms)
        generator = torch.Generator().manual_seed(7)
        model.text_prompts.copy_(torch.randn(model.text_prompts.shape, generator=generator))
        model.vision_prompts.copy_(torch.randn(model.vision_prompts.shape, generator=generator))
    second = shares(model, processor, backbone, "processor", image, "What digit is shown?")
    assert second["text"]["prompt_share"] != pytest.approx(first["text"]["prompt_share"], abs=1e-3)
    assert second["vision"]["prompt_share"] != pytest.approx(first["vision"]["prompt_share"], abs=1e-3)
    image.save(tmp_path / "i.png")
    result = m2pt(
        "attention",
        finished_run,
        "--image",
        tmp_path / "i.png",
        "--prompt",
        "What digit is shown?",
        "--output",
        tmp_path / "a.png",
    )
    assert "attention on prompts per head" in result.stdout
    _png_ok(tmp_path / "a.png")
    numbers = json.loads((tmp_path / "a.json").read_text())
    assert numbers["text"]["layer"] == 3 and numbers["vision"]["layer"] == 2


def test_attention_refuses_an_encoder_layer_that_never_runs(finished_run, tmp_path):
    """LLaVA reads encoder layer -2, so the last encoder block never runs: asking for it is one line,
    not a complaint about the attention kernel (without prompts there, -1 picks the last block that runs)."""
    from m2pt_cli.attention import _block

    assert _block(-1, [], 4, "vision", (3,)) == 2 and _block(-1, [], 4, "text") == 3
    Image.new("RGB", (32, 32), "white").save(tmp_path / "i.png")
    result = m2pt(
        "attention", finished_run, "--image", tmp_path / "i.png", "--prompt", "Digit?", "--layer", "3", check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "m2pt: error: --layer: vision layer 3 never runs (its output never reaches the language model); "
        "choose one below 3"
    )
