"""Bundled recipes by name, from any folder: the installed package holds them (``m2pt_cli.bundled_recipes``),
so nothing depends on the current folder being the checkout. ``.ci/wheel_check.sh`` does the same
with the built wheel installed outside the repository."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from m2pt_cli import config
from m2pt_cli.cli import cli
from m2pt_cli.errors import UserError
from m2pt_cli.recipes import bundled, display_name, folder, resolve
from tests.helpers import m2pt, refused

DEMO_MODEL = str((folder() / "demo" / "model").resolve())


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_recipes_are_listed_from_another_folder(tmp_path):
    """A real process whose current folder is not the checkout (the package comes from the install)."""
    lines = m2pt("recipes", cwd=tmp_path, process=True).stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [path.stem for path in bundled()]
    assert any(line.startswith("demo ") and "./demo/model" in line for line in lines)
    assert lines[-1] == f"(files in {folder()})"


@pytest.mark.parametrize("name", ["demo", "demo.yaml"])
def test_a_bundled_recipe_is_named_from_any_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = run("train", name, "train.max_steps=2", "--print-config")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["name"] == "demo" and printed["train"]["max_steps"] == 2
    assert printed["model"]["name_or_path"] == DEMO_MODEL  # ./demo/model: beside the bundled recipe
    assert not list(tmp_path.iterdir())  # --print-config writes nothing


def test_info_takes_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("info", "demo", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["recipe"] == "demo" and report["model"] == DEMO_MODEL


def test_a_file_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = yaml.safe_load((folder() / "demo.yaml").read_text())
    mine["name"], mine["model"]["name_or_path"] = "mine", DEMO_MODEL
    (tmp_path / "demo").write_text(yaml.safe_dump(mine))
    assert resolve("demo") == tmp_path.joinpath("demo").relative_to(tmp_path)
    result = run("train", "demo", "--print-config")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["name"] == "mine"
    (tmp_path / "demo").unlink()
    (tmp_path / "demo").mkdir()  # a folder is not a recipe file: the bundled one is meant
    assert resolve("demo") == folder() / "demo.yaml"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "dmeo"], "dmeo: no such recipe file; did you mean 'demo'? (m2pt recipes lists the bundled ones)"),
        (["info", "recipes/demo.yaml"], "recipes/demo.yaml: no such recipe file; did you mean 'demo'?"),
        (["sweep", "lava", "--grid", "seed=0,1"], "lava: no such recipe file; did you mean 'llava'?"),
        (["bench", "nothing-like-it"], "nothing-like-it: no such recipe file (m2pt recipes lists the bundled ones)"),
        (["eval", "--bench", "demo", "--recipe", "dem", "--base"], "dem: no such recipe file; did you mean 'demo'?"),
    ],
)
def test_an_unknown_name_is_one_line_with_the_nearest(tmp_path, args, needle):
    refused(args, tmp_path, needle, cwd=tmp_path)


def test_sweep_and_eval_take_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("sweep", "demo", "--grid", "prompts.text.length=0,4", "--bench", "demo", "--print-commands")
    assert result.exit_code == 0, result.output
    assert all(line.startswith("m2pt train demo ") for line in result.output.splitlines() if "train" in line)
    assert config.load("demo").name == "demo"  # the Python API resolves names the same way
    with pytest.raises(UserError, match="no such recipe file; did you mean 'llava'"):
        config.load("llava.yml")


def test_the_demo_bench_and_a_named_recipe_outside_the_checkout(tmp_path):
    """``eval --bench demo`` reads the bundled demo recipe for its split; ``--recipe demo`` names the model."""
    m2pt("eval", "--bench", "demo", "--recipe", "demo", "--base", "--limit", "2", "--output-dir", "out", cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "demo" in json.dumps(results)


def test_reports_name_a_bundled_recipe_as_it_is_typed(tmp_path):
    """``m2pt bench bench-cpu`` reports "m2pt bench bench-cpu", not the installed file's path."""
    assert display_name(resolve("bench-cpu")) == "bench-cpu"
    copy = tmp_path / "bench-cpu.yaml"
    copy.write_text((folder() / "bench-cpu.yaml").read_text())
    assert display_name(copy) == str(copy)
