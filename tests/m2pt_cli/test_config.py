"""Recipe schema: loading, overrides, validation errors, layer specs; every shipped recipe validates."""

from __future__ import annotations

import re

import pytest
import yaml

from m2pt_cli import config
from m2pt_cli.errors import UserError
from m2pt_cli.recipes import bundled

BASE = {
    "model": {"backbone": "llava", "name_or_path": "some/model", "dtype": "bfloat16"},
    "prompts": {"vision": {"length": 10, "layers": "all", "init": "xavier"}, "text": {"length": 10, "layers": "all"}},
    "trainable": ["projector"],
}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("path", bundled(), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = config.load(path)
    assert recipe.name == path.stem
    assert recipe.description


def test_shipped_recipes_are_found():
    assert {p.name for p in bundled()} >= {"demo.yaml", "llava.yaml"}


def test_llava_recipe_has_the_paper_setup():
    r = config.load(next(p for p in bundled() if p.name == "llava.yaml"))
    assert (r.prompts.vision.length, r.prompts.text.length) == (10, 10)
    assert (r.prompts.vision.layers, r.prompts.text.layers) == ("all", "all")
    t = r.train
    assert (t.epochs, t.learning_rate, t.global_batch_size, t.lr_scheduler) == (3.0, 7e-4, 32, "cosine")
    assert (t.warmup_ratio, t.weight_decay, t.gradient_checkpointing) == (0.03, 0.0, True)
    assert r.model.dtype == "bfloat16" and r.data.max_length == 1024


def test_defaults_recipe_then_overrides(tmp_path):
    path = write(tmp_path, BASE)
    r = config.load(path, ["prompts.text.length=20", "prompts.vision.layers=0-15", "train.learning_rate=1e-4"])
    assert r.prompts.text.length == 20
    assert config.resolve_layers(r.prompts.vision.layers, 24, (23,), "k") == list(range(16))
    assert r.train.learning_rate == 1e-4
    assert r.prompts.text.init == "xavier"  # schema default
    assert r.train.epochs == 3.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompts.text.lenght=3", "unknown key 'prompts.text.lenght'; did you mean 'length'?"),
        ("promts.text.length=3", "unknown key 'promts'; did you mean 'prompts'?"),
        ("prompts.text.length=-1", "prompts.text.length: must be 0 or more, got -1"),
        ("prompts.text.length=ten", "prompts.text.length: expected an integer, got 'ten'"),
        ("prompts.vision.layers=5-2", "prompts.vision.layers: range '5-2' is empty"),
        ("prompts.vision.layers=first", "prompts.vision.layers: 'first' is not a layer spec"),
        ("model.dtype=bf16", "model.dtype: 'bf16' is not allowed"),
        ("prompts.text.init=xavir", "did you mean 'xavier'?"),
        ("trainable=projector", "trainable: expected a list of strings, got 'projector'"),
        ("prompts.text", "expected KEY=VALUE"),
        ("method=prefix", "method: 'prefix' is not allowed"),
        (
            "train.global_batch_size=30",
            "train.global_batch_size: 30 is not a multiple of train.per_device_batch_size (4)",
        ),
        ("data.sources=[{format: jsonl}]", "data.sources[0].format: 'jsonl' is not allowed"),
        ("data.sources=[{format: llava_json}]", "data.sources[0].path: a llava_json source needs a path"),
        ("data.sources=[{formt: hf}]", "data.sources[0].formt: unknown key; did you mean 'format'?"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, message):
    path = write(tmp_path, BASE)
    with pytest.raises(UserError) as err:
        config.load(path, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_names_file_and_path(tmp_path):
    data = {**BASE, "prompts": {"vision": {"lenght": 3}}}
    path = write(tmp_path, data)
    with pytest.raises(UserError, match=r"r\.yaml: prompts\.vision\.lenght: unknown key; did you mean 'length'\?"):
        config.load(path)


def test_malformed_yaml_gives_the_line(tmp_path):
    path = write(tmp_path, "model:\n  backbone: llava\n  dtype: [bfloat16\nprompts: {}\n")
    with pytest.raises(UserError, match=r"r\.yaml: line \d+: malformed YAML"):
        config.load(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        config.load(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    source = {"format": "llava_json", "path": "rel/data.json", "image_folder": "../imgs"}
    data = {**BASE, "model": {"name_or_path": "./weights"}, "data": {"sources": [source]}}
    r = config.load(write(sub, data))
    assert r.model.name_or_path == str(sub / "weights")
    assert r.data.sources[0].path == "rel/data.json"  # plain relative paths stay relative to the working directory
    assert r.data.sources[0].image_folder == str(tmp_path / "imgs")


@pytest.mark.parametrize(
    "spec, unused, expected",
    [
        ("all", (3,), [0, 1, 2]),
        ("all", (), [0, 1, 2, 3]),
        ("1-2", (), [1, 2]),
        ([3, 0, 0], (), [0, 3]),
        ([-1], (), [3]),
        (2, (), [2]),
        ([], (), []),
    ],
)
def test_resolve_layers(spec, unused, expected):
    assert config.resolve_layers(spec, 4, unused, "k") == expected


def test_layer_beyond_the_model():
    with pytest.raises(UserError, match=r"prompts.text.layers: layer 32 is out of range; the model has 32 layers"):
        config.resolve_layers([0, 32], 32, (), "prompts.text.layers")


def test_a_layer_whose_output_is_never_read_is_refused():
    with pytest.raises(UserError, match=r"k: layer 23's output never reaches the language model.*usable: 0-22, or all"):
        config.resolve_layers("0-23", 24, (23,), "k")
    with pytest.raises(UserError, match="layer 23's output"):
        config.resolve_layers([-1], 24, (23,), "k")


def test_dump_round_trips(tmp_path):
    r = config.load(write(tmp_path, BASE), ["prompts.text.layers=[1, 2]"])
    again = config.load(write(tmp_path, yaml.safe_load(config.dump(r)), "again.yaml"))
    assert config.to_dict(again) == {**config.to_dict(r), "name": "r"}


def test_first_difference_names_the_first_differing_key():
    from m2pt_cli.continuation import first_difference

    assert first_difference({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 2]}}) is None
    assert first_difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == "b.c was 2, now 3"
    assert first_difference({"a": 1}, {"a": 1, "z": "x"}) == 'z was absent, now "x"'
    assert first_difference({"g": [["k", [0, 2]]]}, {"g": [["k", [0, 4]]]}) == "g[0][1][1] was 2, now 4"
    assert first_difference({"o": ["x"]}, {"o": ["x", "y"]}) == 'o had 1 items, now 2 (new: "y")'


OPENCLIP = {**BASE, "model": {"backbone": "openclip_vicuna", "name_or_path": "some/llm", "vision_tower": "ViT-L-14"}}


def test_a_backbones_own_keys_join_its_model_section(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    model = {**OPENCLIP["model"], "vision_tower": "./vit", "projector_weights": "../mm_projector.bin"}
    r = config.load(write(sub, {**OPENCLIP, "model": model}), ["model.projector=mlp2x_gelu"])
    assert r.model.vision_tower == str(sub / "vit")  # a declared path key is relative to the recipe
    assert r.model.projector_weights == str(tmp_path / "mm_projector.bin")
    assert (r.model.projector, r.model.vision_pretrained) == ("mlp2x_gelu", "")  # override; the declared default
    dumped = yaml.safe_load(config.dump(r))["model"]
    assert dumped["vision_tower"] == str(sub / "vit") and dumped["projector"] == "mlp2x_gelu"
    assert "vision_tower" not in yaml.safe_load(config.dump(config.load(write(tmp_path, BASE))))["model"]
    again = config.load(write(tmp_path, yaml.safe_load(config.dump(r)), "again.yaml"))
    assert config.to_dict(again) == {**config.to_dict(r), "name": "r"}


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        (OPENCLIP, ["model.projector=lin"], "model.projector: 'lin' is not allowed; did you mean 'linear'?"),
        (OPENCLIP, ["model.vison_tower=x"], "unknown key 'model.vison_tower'; did you mean 'vision_tower'?"),
        (
            {**OPENCLIP, "model": {**OPENCLIP["model"], "vison_tower": "x"}},
            [],
            "model.vison_tower: unknown key; did you mean 'vision_tower'? (allowed: backbone, name_or_path, ",
        ),
        (OPENCLIP, ["model.vision_tower=3"], "model.vision_tower: expected a string, got 3"),
        (
            BASE,
            ["model.projector_weights=x.bin"],
            "model.projector_weights: backbone 'llava' does not read it; "
            "remove the key or use backbone openclip_vicuna",
        ),
        (OPENCLIP, ["model.backbone=llava"], "model.vision_tower: backbone 'llava' does not read it"),
        (BASE, ["model.backbone=lava"], "model.backbone: unknown backbone 'lava'; did you mean 'llava'?"),
    ],
)
def test_backbone_keys_are_checked_for_the_recipes_backbone(tmp_path, data, overrides, message):
    with pytest.raises(UserError) as err:
        config.load(write(tmp_path, data), overrides)
    assert message in str(err.value)


def test_keys_of_another_backbone_at_their_defaults_still_load(tmp_path):
    """An older m2pt saved every backbone's keys in each recipe.yaml; at their defaults they change nothing."""
    old = {**BASE, "model": {**BASE["model"], "vision_tower": "", "projector": "linear", "projector_weights": ""}}
    r = config.load(write(tmp_path, old))
    assert not hasattr(r.model, "vision_tower") and type(r.model) is config.ModelCfg


def test_overrides_may_switch_the_backbone_after_setting_its_keys(tmp_path):
    r = config.load(write(tmp_path, BASE), ["model.vision_tower=ViT-B-32", "model.backbone=openclip_vicuna"])
    assert (r.model.backbone, r.model.vision_tower) == ("openclip_vicuna", "ViT-B-32")


def test_a_model_section_must_hold_its_backbones_keys(tmp_path):
    import dataclasses

    from m2pt_cli.loading import check_model_keys
    from m2pt_cli.registry import BACKBONES

    llava = config.load(write(tmp_path, BASE))
    switched = dataclasses.replace(llava, model=dataclasses.replace(llava.model, backbone="openclip_vicuna"))
    with pytest.raises(UserError, match=r"model: the section lacks backbone 'openclip_vicuna'\'s keys \(vision_tower"):
        check_model_keys(switched, BACKBONES.get("openclip_vicuna"))
    made = config.model_cfg("openclip_vicuna", vision_tower="ViT-L-14")
    check_model_keys(dataclasses.replace(llava, model=made), BACKBONES.get("openclip_vicuna"))
    with pytest.raises(UserError, match="model.vision_tower: backbone 'llava' does not read it"):
        check_model_keys(
            dataclasses.replace(llava, model=dataclasses.replace(made, backbone="llava")), BACKBONES.get("llava")
        )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"format": "digits", "questions": [0, 3]}, r"questions: \[3\] are not question wordings \(allowed: 0, 1, 2\)"),
        ({"format": "hf", "path": "x", "questions": [0]}, "only the digits format has question wordings"),
    ],
)
def test_digit_question_choices_are_checked(tmp_path, source, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"sources": [source]}}))
    with pytest.raises(UserError, match=message):
        config.load(path)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train:\n  max_steps: 3\nseed: 1\ntrain:\n  max_steps: 5\n",
            "line 4: key 'train' given twice (first on line 1)",
        ),
        ("prompts:\n  text:\n    length: 2\n    length: 4\n", "line 4: key 'length' given twice (first on line 3)"),
        ("seed: 1\n'seed': 2\n", "line 2: key 'seed' given twice (first on line 1)"),
    ],
    ids=["section", "key", "quoted"],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys silently; a recipe file names both lines instead."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"^{re.escape(f'{path}: {message}; keep one')}$"):
        config.load(path)


def test_a_key_merged_from_an_anchor_may_be_overridden(tmp_path):
    """``<<: *anchor`` then the same key: YAML's own override, not a key given twice."""
    path = tmp_path / "merge.yaml"
    path.write_text("x-text: &text {length: 2, init: zeros}\nprompts:\n  text:\n    <<: *text\n    length: 5\n")
    raw = config.read_yaml(path)
    assert raw["prompts"]["text"] == {"length": 5, "init": "zeros"}


def test_a_yaml_11_boolean_key_is_named_as_written(tmp_path):
    """``yes:`` is the key 'yes' (not True): the error quotes what the file says."""
    path = tmp_path / "yes.yaml"
    path.write_text("prompts:\n  yes: 2\n")
    with pytest.raises(UserError, match=r"prompts\.yes: unknown key"):
        config.load(path)
    assert config.read_yaml(path) == {"prompts": {"yes": 2}}


# ----------------------------------------------------------------------------- #37: values that cost gigabytes


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=0", "train.max_steps: must be 1 or more, or -1 (train by train.epochs), got 0"),
        ("train.max_steps=-5", "train.max_steps: must be 1 or more, or -1 (train by train.epochs), got -5"),
        ("train.learning_rate=.nan", "train.learning_rate: must be a finite number above 0, got nan"),
        ("train.learning_rate=nan", "train.learning_rate: must be a finite number above 0, got nan"),
        ("train.learning_rate=inf", "train.learning_rate: must be a finite number above 0, got inf"),
        ("train.learning_rate=-.inf", "train.learning_rate: must be a finite number above 0, got -inf"),
        ("train.learning_rate=-1e-4", "train.learning_rate: must be a finite number above 0, got -0.0001"),
        ("train.learning_rate=0", "train.learning_rate: must be a finite number above 0, got 0.0"),
        ("train.epochs=0", "train.epochs: must be a finite number above 0, got 0.0"),
        ("train.epochs=.inf", "train.epochs: must be a finite number above 0, got inf"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio: must be a finite number at least 0 and at most 1, got 1.5"),
        ("train.warmup_ratio=-0.1", "train.warmup_ratio: must be a finite number at least 0 and at most 1"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be a finite number at least 0, got -0.1"),
        ("train.weight_decay=.nan", "train.weight_decay: must be a finite number at least 0, got nan"),
        ("train.eval_steps=-1", "train.eval_steps: must be 0 or more, got -1"),
        ("train.eval_samples=-2", "train.eval_samples: must be 0 or more or -1 (all), got -2"),
        ("train.eval_max_new_tokens=0", "train.eval_max_new_tokens: must be 1 or more, got 0"),
        ("train.dataloader_num_workers=-1", "train.dataloader_num_workers: must be 0 to 256, got -1"),
        ("train.dataloader_num_workers=100000", "train.dataloader_num_workers: must be 0 to 256, got 100000"),
        ("seed=-1", "seed: must be 0 to 4294967295, got -1"),
        ("seed=4294967296", "seed: must be 0 to 4294967295, got 4294967296"),
        ("data.eval_size=-1", "data.eval_size: must be a finite number at least 0, got -1.0"),
        ("data.eval_size=.nan", "data.eval_size: must be a finite number at least 0, got nan"),
        ("lora.alpha=.nan", "lora.alpha: must be a finite number above 0, got nan"),
        ("lora.dropout=1", "lora.dropout: must be below 1 (1 drops everything), got 1.0"),
        ("lora.dropout=-0.5", "lora.dropout: must be a finite number at least 0 and at most 1, got -0.5"),
        ("prompts.text.length=10000000", "prompts.text.length: 10000000 is over prompts.length_limit (1024)"),
        ("prompts.vision.length=1025", "prompts.vision.length: 1025 is over prompts.length_limit (1024)"),
        ("prompts.length_limit=-1", "prompts.length_limit: must be 0 or more, got -1"),
        ('name="a\\nb"', "name: 'a\\nb' is not allowed"),
        ('name="run\\x1b[31m"', "name: 'run\\x1b[31m' is not allowed"),
        ('name="tab\\there"', "name: 'tab\\there' is not allowed"),
        (f"name={'n' * 201}", "name: 201 characters; a run folder's name allows at most 200"),
    ],
)
def test_numbers_and_names_are_checked_before_anything_loads(tmp_path, override, message):
    with pytest.raises(UserError) as refusal:
        config.load(write(tmp_path, BASE), [override])
    assert message in str(refusal.value) and "\n" not in str(refusal.value)


def test_source_weight_and_limit_are_checked(tmp_path):
    for source, message in [
        ({"format": "digits", "weight": float("nan")}, "data.sources[0].weight: must be a finite number above 0"),
        ({"format": "digits", "weight": float("inf")}, "data.sources[0].weight: must be a finite number above 0"),
        ({"format": "digits", "limit": -2}, "data.sources[0].limit: must be 0 or more or -1 (all), got -2"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            config.load(write(tmp_path, {**BASE, "data": {"sources": [source]}}))


def test_special_values_mean_what_the_schema_says(tmp_path):
    """-1 is "all" or "by epochs" where the help says so; the length limit can be raised on purpose."""
    path = write(tmp_path, BASE)
    r = config.load(path, ["train.max_steps=-1", "train.eval_samples=-1", "train.max_steps=1"])
    assert (r.train.max_steps, r.train.eval_samples) == (1, -1)
    r = config.load(path, ["prompts.length_limit=4096", "prompts.text.length=2000"])
    assert r.prompts.text.length == 2000
    assert "-1: train by epochs" in config.TrainCfg.__dataclass_fields__["max_steps"].metadata["help"]
    assert config.load(path, ["prompts.text.length=1024"]).prompts.text.length == 1024


def test_a_huge_layer_range_is_two_numbers_until_checked():
    """``0-99999999`` took 4.6 GB as a list before its first index was checked; now it is a range,
    refused against the model's layer count before one index is walked."""
    parsed = config.parse_layers("0-99999999", "k")
    assert isinstance(parsed, range) and len(parsed) == 100_000_000
    with pytest.raises(UserError, match=r"k: layer 4 is out of range; the model has 4 layers \(0-3\)"):
        config.resolve_layers("0-99999999", 4, (), "k")
    assert config.resolve_layers("1-2", 4, (), "k") == [1, 2]
    with pytest.raises(UserError, match="layer 4 is out of range"):
        config.resolve_layers("2-4", 4, (), "k")
