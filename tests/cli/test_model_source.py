"""The evaluation path as a straight line: what a command names as its model is resolved once
(``model_source.resolve_model_source``) and carried as one ``ModelSource``; one ``m2pt eval``
finds the adapter, reads its recipe, reads and verifies its metadata and hashes its tensor file
exactly once each, in that order (issue #39, item 4)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest

from tests.helpers import m2pt

# (module, function): each step of resolving a model, and the one read of the tensors to load them
STEPS = (
    ("m2pt_cli.adapter", "find_adapter"),
    ("m2pt_cli.adapter", "recipe_of"),
    ("m2pt_cli.config", "read_yaml"),
    ("m2pt_cli.adapter", "read_meta"),
    ("m2pt_cli.adapter", "read_header"),
    ("m2pt_cli.adapter", "sha256"),
    ("m2pt_cli.adapter", "read_tensors"),
)


@pytest.fixture
def trail(monkeypatch) -> list[tuple[str, Path]]:
    """Every call of a step, as (function, first argument), in order: each function is replaced by a
    recording one in its module and in every m2pt module that imported it by name."""
    calls: list[tuple[str, Path]] = []
    for module_name, name in STEPS:
        original = getattr(importlib.import_module(module_name), name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, Path(args[0])))
            return _original(*args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("m2pt_cli") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, spy)
    return calls


def of_run(trail: list[tuple[str, Path]], run: Path) -> list[tuple[str, Path]]:
    """The calls on the run's files (the demo bench reads the bundled demo recipe for its data)."""
    return [(name, path) for name, path in trail if path == run or run in path.parents]


def test_one_eval_finds_reads_verifies_and_hashes_the_adapter_once(finished_run, trail, tmp_path):
    out = tmp_path / "eval"
    m2pt("eval", "--bench", "demo", "--adapter", finished_run, "--limit", 2, "--output-dir", out)
    folder = finished_run / "adapter"
    recipe = next(p for p in (folder / "recipe.yaml", finished_run / "config.yaml") if p.is_file())
    weights = folder / "adapter.safetensors"
    assert of_run(trail, finished_run) == [
        ("find_adapter", finished_run),
        ("recipe_of", folder),
        ("read_yaml", recipe),
        ("read_meta", folder),
        ("read_header", folder),
        ("sha256", weights),
        ("read_tensors", folder),
    ]
    model = json.loads((out / "results.json").read_text())["model"]
    assert model["adapter"] == str(folder)
    assert model["adapter_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_a_base_eval_reads_the_adapters_recipe_and_nothing_else_of_it(finished_run, trail, tmp_path):
    out = tmp_path / "base"
    m2pt("eval", "--bench", "demo", "--adapter", finished_run, "--base", "--limit", 2, "--output-dir", out)
    assert [name for name, _ in of_run(trail, finished_run)] == ["find_adapter", "recipe_of", "read_yaml"]
    model = json.loads((out / "results.json").read_text())["model"]
    assert model["adapter"] is None and model["adapter_sha256"] is None and model["method"] == "base"


def test_export_reads_the_recipe_and_hashes_the_source_once(finished_run, trail, tmp_path):
    """Export finds the adapter before it checks --output, and hands the folder found (which finding
    again returns as it is) to the resolution: everything else happens once."""
    folder = finished_run / "adapter"
    m2pt("export", finished_run, "--output", tmp_path / "out")
    calls = of_run(trail, finished_run)
    assert [path for name, path in calls if name == "find_adapter"] == [finished_run, folder]
    steps = [name for name, _ in calls if name != "find_adapter"]
    assert sorted(steps) == sorted(["recipe_of", "read_yaml", "read_meta", "read_header", "sha256", "read_tensors"])


def test_the_resolved_source_carries_what_the_files_say(finished_run):
    from m2pt_cli import config
    from m2pt_cli.model_source import resolve_model_source

    source = resolve_model_source(finished_run)
    folder = finished_run / "adapter"
    weights = (folder / "adapter.safetensors").read_bytes()
    assert source.adapter == folder and not source.base_only
    assert source.adapter_meta == json.loads((folder / "m2pt_adapter.json").read_text())
    assert source.adapter_sha256 == hashlib.sha256(weights).hexdigest() == source.adapter_meta["sha256"]
    assert config.dump(source.recipe) == config.dump(config.load(source.recipe_file))
    assert source.base == source.recipe.model.name_or_path
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.adapter = None  # type: ignore[misc]
    base = resolve_model_source(finished_run, base_only=True)
    assert base.adapter is None and base.adapter_sha256 is None and base.base_only
    assert base.recipe.prompts.vision.length == base.recipe.prompts.text.length == 0
