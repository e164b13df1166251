"""``m2pt data``: the recipe's data prepared and cached as training would, without the weights."""

from __future__ import annotations

import json
import shutil

from sklearn.datasets import load_digits

from m2pt_cli import config
from m2pt_cli.data import cache
from m2pt_cli.data.encode import Encoder
from m2pt_cli.loading import load_processor
from tests.helpers import m2pt


def test_data_reports_what_training_reads_and_caches_it(tmp_path):
    env = {"M2PT_CACHE": str(tmp_path / "cache")}
    first = json.loads(m2pt("data", "demo", "--json", env=env).stdout)
    digits = len(load_digits().images)
    assert (first["records"], first["kept"], first["held_out"]) == (digits, digits, 200)
    assert first["train"] + first["held_out"] == first["kept"] and first["skipped"] == {}
    tokens = first["tokens_per_record"]
    assert 0 < tokens["min"] <= tokens["median"] <= tokens["max"] <= config.load("demo").data.max_length
    padding = first["padding"]
    assert padding["tokens"] >= first["train"] * tokens["min"]
    assert padding["length"] <= padding["none"] and padding["modality_length"] <= padding["none"]
    assert len(first["cache"]) == 1 and first["cache"][0].startswith("data.sources[0]: built ")
    again = m2pt("data", "demo", env=env).stdout
    assert "data.sources[0]: reused " in again and f"{digits} records, {digits} usable" in again
    assert "tokens per record: min" in again and "padding in batches of 32, group_by modality_length" in again


def test_data_loads_no_weights(tmp_path):
    """A base folder without its weights file: ``m2pt data`` prepares the data all the same."""
    recipe = config.load("demo")
    model = tmp_path / "model"
    shutil.copytree(recipe.model.name_or_path, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    result = m2pt("data", "demo", f"model.name_or_path={model}", env={"M2PT_CACHE": str(tmp_path / "cache")})
    assert "1797 usable" in result.stdout


def test_each_backbone_processor_alone_encodes_as_the_loaded_one(case):
    """What ``m2pt data`` caches is what ``m2pt train`` looks up: the processor loaded without the
    weights gives the same encoding identity (tokenizer, template, image-token layout) as the one
    loaded with the model."""
    recipe = config.load(case.recipe)
    alone = load_processor(recipe)
    loaded = case.backbone.load(recipe.model).processor
    identities = [
        cache.encoding_identity(Encoder(p, case.backbone, case.template, 512), recipe.data) for p in (alone, loaded)
    ]
    assert identities[0] == identities[1]
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dot."}]
    encoded = [Encoder(p, case.backbone, case.template, 512).encode(turns, "r") for p in (alone, loaded)]
    assert encoded[0] == encoded[1] and encoded[0] is not None


def test_a_bad_data_key_is_one_line(tmp_path):
    result = m2pt("data", "demo", "data.num_proc=-1", check=False, env={"M2PT_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2 and "data.num_proc: must be 0" in result.stderr
    assert "Traceback" not in result.stderr
