"""What the wheel holds, read from pyproject.toml: every package folder is listed (the list is explicit,
since backbones/ and recipes/ install under m2pt_cli) and every file of recipes/ is package data.
``.ci/wheel_check.sh`` builds the wheel and runs it outside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def folder_of(package: str) -> Path:
    """Where setuptools reads ``package`` from (the longest package-dir prefix, as it does)."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        mapped = SETUPTOOLS["package-dir"].get(".".join(parts[:cut]))
        if mapped is not None:
            return REPO / mapped / Path(*parts[cut:])
    return REPO / Path(*parts)


def test_every_package_folder_is_listed():
    listed = set(SETUPTOOLS["packages"])
    found = set()
    for package in listed:
        root = folder_of(package)
        for init in root.rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(root).parts]))
    assert found == listed
    assert all(name == "m2pt_cli" or name.startswith("m2pt_cli.") for name in listed)  # one import name


def test_every_bundled_file_is_package_data():
    package = "m2pt_cli.bundled_recipes"
    root = folder_of(package)
    shipped = {p for pattern in SETUPTOOLS["package-data"][package] for p in root.glob(pattern) if p.is_file()}
    wanted = {p for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert shipped == wanted
    assert root / "demo" / "model" / "model.safetensors" in shipped
