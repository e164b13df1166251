"""The versions CI tests are the versions pyproject.toml admits."""

from __future__ import annotations

import re

from tests.helpers import REPO


def lower_bounds() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    deps = text[text.index("dependencies = [") : text.index("]", text.index("dependencies = ["))]
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)', deps)}


def test_ci_oldest_pins_are_pyprojects_lower_bounds():
    pins = {}
    for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    bounds = lower_bounds()
    assert set(pins) == {"transformers", "peft", "open_clip_torch"}
    for name, version in pins.items():
        assert tuple(map(int, version.split(".")))[: len(bounds[name].split("."))] == tuple(
            map(int, bounds[name].split("."))
        ), f"{name}: CI tests {version}, pyproject admits >= {bounds[name]}"


def test_torch_without_the_weights_only_bypass_is_required():
    assert tuple(map(int, lower_bounds()["torch"].split("."))) >= (2, 6)  # CVE-2025-32434
