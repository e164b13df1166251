"""Fixtures of the chat and serve tests: one short-trained demo adapter and digit images."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest

from tests.conftest import built_once
from tests.helpers import REPO, m2pt


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory) -> Path:
    """The demo recipe trained for 40 steps (about 25 s): its answers are digits, mostly."""
    args = ("train", REPO / "recipes" / "demo.yaml", "train.max_steps=40", "train.save_steps=40", "--output-dir")
    return built_once(tmp_path_factory, "served", lambda folder: m2pt(*args, folder / "demo-run")) / "demo-run"


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> list[tuple[Path, str]]:
    """16 held-out demo digits as PNG files, each with its bench question."""
    from m2pt_cli.benches import BENCHES

    folder = tmp_path_factory.mktemp("digits")
    out = []
    for k, sample in enumerate(islice(BENCHES.get("demo").samples(None, None, False), 16)):
        path = folder / f"digit-{k}.png"
        path.write_bytes(sample.image["bytes"])
        out.append((path, sample.question))
    return out
