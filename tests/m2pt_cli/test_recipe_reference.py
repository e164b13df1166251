"""The recipe reference is generated from the schema: the committed file is what the schema
generates, and it names every key a recipe can hold."""

from __future__ import annotations

import dataclasses
import re

import pytest

from m2pt_cli import config
from m2pt_cli.recipe_reference import GENERATED_BY, built_in_backbones, markdown
from m2pt_cli.registry import BACKBONES
from tests.conftest import REPO
from tests.helpers import m2pt

REFERENCE = REPO / "docs" / "recipe-reference.md"


def _leaf_paths(value, prefix: str = "") -> set[str]:
    """Every leaf key of a recipe dumped as plain data (a list of sections as ``key[].``)."""
    paths: set[str] = set()
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, dict):
            paths |= _leaf_paths(item, f"{path}.")
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            paths |= _leaf_paths(item[0], f"{path}[].")
        else:
            paths.add(path)
    return paths


def _documented(text: str) -> set[str]:
    return {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}


def test_committed_reference_is_what_the_schema_generates():
    expected = markdown(built_in_backbones())
    assert REFERENCE.read_text() == expected, f"docs/recipe-reference.md is stale: run {GENERATED_BY}"


def test_reference_names_every_key_of_a_recipe_and_of_each_backbone():
    recipe = config.Recipe()
    recipe.data.sources = [config.SourceCfg()]
    keys = _leaf_paths(config.to_dict(recipe))
    for name in built_in_backbones():
        model = config.model_cfg(name)
        keys |= {f"model.{f.name}" for f in dataclasses.fields(model)}
    documented = _documented(REFERENCE.read_text())
    assert keys - documented == set()
    assert documented - keys == set()


def test_every_key_has_a_meaning():
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("| `"):
            assert line.rstrip("| ").rsplit("|", 1)[1].strip(), line


def test_info_keys_lists_the_same_keys_with_plugins():
    out = m2pt("info", "--keys").stdout
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("      ")}
    assert _documented(REFERENCE.read_text()) <= listed
    assert set(built_in_backbones()) <= set(BACKBONES.names())


def test_info_without_recipe_or_with_both_is_a_usage_error():
    assert m2pt("info", check=False).returncode == 2
    both = m2pt("info", "--keys", "demo", check=False)
    assert both.returncode == 2 and "takes no RECIPE" in both.stderr


def _allowed_rows() -> list[tuple[str, list[str]]]:
    rows = []
    section = ""
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("| `") and section == "recipe":
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[3]:
                rows.append((cells[0].strip("`"), cells[3].split(", ")))
    return rows


def test_the_allowed_values_listed_are_the_ones_recipes_accept():
    """Each key the reference lists with allowed values refuses one that is not listed, naming the
    key, and accepts every one that is (checked through recipe loading, not the reference's code)."""
    from m2pt_cli.errors import UserError

    rows = _allowed_rows()
    assert {"method", "model.dtype", "train.precision", "data.sources[].format"} <= {path for path, _ in rows}
    for path, allowed in rows:
        key = path.replace("[]", "[0]")
        with pytest.raises(UserError, match=re.escape(key)):
            config.load("demo", (f"{key}=not-a-choice",))
        for value in allowed:
            try:
                config.load("demo", (f"{key}={value}",))
            except UserError as exc:  # another rule may refuse the combination, never the choice
                assert "is not allowed" not in str(exc), (key, value, exc)
