"""A GGUF LLM named in a recipe: a missing file, a file that is not GGUF, or a package that is not
installed is one line (exit 2) naming ``model.name_or_path``, with nothing written."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import refused

pytestmark = pytest.mark.bad_input


def recipe(tmp_path, name_or_path: str):
    model = {"backbone": "openclip_vicuna", "name_or_path": name_or_path, "vision_tower": "ViT-S-32"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return path


@pytest.mark.parametrize(
    ("name_or_path", "needles"),
    [
        ("./missing.gguf", ("model.name_or_path", "missing.gguf", "is not a file")),
        ("./weights.gguf", ("model.name_or_path", "weights.gguf", "is not a GGUF file")),
        ("package:no_such_package_m2pt/x.gguf", ("model.name_or_path", "'no_such_package_m2pt' is not installed")),
        ("package:json", ("model.name_or_path", "must be package:NAME/FILE")),
    ],
)
def test_bad_gguf_names_are_refused(tmp_path, name_or_path, needles):
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    path = recipe(tmp_path, name_or_path)
    refused(["info", path], tmp_path, *needles)


def test_train_refuses_a_file_that_is_not_gguf_before_writing(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    path = recipe(tmp_path, "./weights.gguf")
    refused(["train", path, "--output-dir", tmp_path / "run"], tmp_path, "is not a GGUF file")
