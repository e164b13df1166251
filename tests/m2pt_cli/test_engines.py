"""Distributed engines and launches: FSDP's current Trainer form, DeepSpeed's shipped configs (what
can be checked without DeepSpeed), and two "nodes" on the loopback interface equal to one process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2pt_cli import config, engines, recipes, trainer
from m2pt_cli.errors import UserError
from tests.conftest import REPO
from tests.helpers import adapter, free_port, m2pt

SHIPPED = REPO / "recipes" / "deepspeed"


def arguments(recipe_path, tmp_path, *overrides, world_size=1, use_cpu=False):
    recipe = config.load(recipe_path, list(overrides))
    return trainer.training_arguments(recipe, tmp_path / "run", world_size, False, use_cpu)


# ----------------------------------------------------------------------------- FSDP


def test_fsdp_reaches_the_trainer_in_its_current_form(train_recipe, tmp_path, caplog):
    """``fsdp=True`` and an ``fsdp_config`` dict (a string ``fsdp`` is deprecated in transformers 5):
    FSDP2, the JSON's entries read, and no deprecation warning."""
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_cpu_offload": True, "reshard_after_forward": False}))
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers").propagate = True
        args = arguments(train_recipe, tmp_path, "train.fsdp=true", f"train.fsdp_config={path}")
    assert args.fsdp is True
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["cpu_offload"] is True  # the fsdp_ prefix is read as transformers reads it
    assert args.fsdp_plugin_args["reshard_after_forward"] is False
    assert "deprecated" not in caplog.text.lower()


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("full_shard auto_wrap", {"reshard_after_forward": True}),
        ("shard_grad_op offload", {"reshard_after_forward": False, "cpu_offload": True}),
    ],
)
def test_older_fsdp_words_become_the_config_entries_they_mean(words, expected):
    """What transformers' own (deprecated) translation makes of them, done before it is asked to."""
    made = engines.fsdp_arguments(words, "")
    assert made == {"fsdp": True, "fsdp_config": expected}


def test_the_fsdp_config_file_wins_over_older_words(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"reshard_after_forward": False}))
    assert engines.fsdp_arguments("full_shard", str(path))["fsdp_config"] == {"reshard_after_forward": False}


@pytest.mark.parametrize(
    ("fsdp", "config_text", "message"),
    [
        ("full_shard hybrid", None, "train.fsdp: 'hybrid' is not an FSDP option (allowed: true, or full_shard"),
        (True, "{not json", "is not valid JSON"),
        (True, "[1, 2]", "holds list; expected a JSON object"),
        (False, "{}", "train.fsdp_config: set, but train.fsdp is off"),
    ],
)
def test_bad_fsdp_settings_are_one_line_errors(tmp_path, fsdp, config_text, message):
    path = tmp_path / "fsdp.json"
    if config_text is not None:
        path.write_text(config_text)
    with pytest.raises(UserError) as caught:
        engines.fsdp_arguments(fsdp, str(path) if config_text is not None else "")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_fsdp_on_cpu_processes_is_refused_before_the_model_loads(train_recipe, tmp_path):
    """accelerate shards only over accelerators: a CPU launch would train plain DDP while the
    recipe says FSDP, so m2pt refuses it in one line."""
    result = m2pt("train", train_recipe, "train.fsdp=true", "--output-dir", tmp_path / "run", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("m2pt: error: train.fsdp: FSDP shards over GPUs")
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "adapter").exists()


def test_a_run_saved_with_fsdp_off_as_an_empty_string_is_the_same_recipe(train_recipe, tmp_path):
    """An older m2pt wrote ``fsdp: ''`` into a run's config.yaml: resuming compares it equal to false."""
    import yaml

    old = yaml.safe_load(train_recipe.read_text())
    old["train"]["fsdp"] = ""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert config.to_dict(config.load(path)) == config.to_dict(config.load(train_recipe))
    assert config.load(path).train.fsdp is False


# ----------------------------------------------------------------------------- DeepSpeed


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_shipped_deepspeed_configs_resolve_every_auto_value(name, train_recipe, tiny_llava_dir, tmp_path):
    """transformers' own HfTrainerDeepSpeedConfig methods fill every "auto" from m2pt's
    TrainingArguments and the model, as the Trainer does at start, with no mismatch. Without
    DeepSpeed installed transformers gives that class no base, so its methods are set here on
    accelerate's config class (the base it has when DeepSpeed is installed; it needs no DeepSpeed)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import AutoConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    methods = {k: v for k, v in vars(HfTrainerDeepSpeedConfig).items() if k not in ("__init__", "__dict__")}
    resolver = type("Resolver", (HfDeepSpeedConfig,), methods)
    raw = json.loads((SHIPPED / f"{name}.json").read_text())
    assert raw["zero_optimization"]["stage"] == int(name[-1])
    args = arguments(train_recipe, tmp_path, "train.global_batch_size=16", "train.per_device_batch_size=4")

    class Model(torch.nn.Module):
        config = AutoConfig.from_pretrained(tiny_llava_dir)

    resolved = resolver(str(SHIPPED / f"{name}.json"))
    resolved._dtype, resolved.mismatches = None, []
    resolved.trainer_config_process(args)
    resolved.trainer_config_finalize(args, Model(), num_training_steps=8)
    filled = resolved.config
    assert resolved.is_zero3() == (name == "zero3")

    def autos(node, where=""):
        if isinstance(node, dict):
            return [a for key, value in node.items() for a in autos(value, f"{where}.{key}")]
        return [where] if node == "auto" else []

    assert autos(filled) == []
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 4
    assert filled["train_batch_size"] == 16  # the recipe's global batch
    assert filled["fp16"]["enabled"] is False and filled["bf16"]["enabled"] is False  # the recipe is fp32
    hidden = Model.config.text_config.hidden_size
    assert filled["zero_optimization"]["reduce_bucket_size"] == hidden * hidden


@pytest.mark.parametrize("value", ["zero2", "zero3", "file"])
def test_the_deepspeed_key_reaches_training_arguments(value, train_recipe, tmp_path, monkeypatch):
    """``train.deepspeed=zero2`` names the shipped file, a path names itself; TrainingArguments gets
    it (recorded here: building real ones needs DeepSpeed installed)."""
    own = tmp_path / "mine.json"
    own.write_text((SHIPPED / "zero2.json").read_text())
    spec = own if value == "file" else value
    seen = {}
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object() if name == "deepspeed" else None)
    monkeypatch.setattr(trainer, "TrainingArguments", lambda **kwargs: seen.update(kwargs))
    arguments(train_recipe, tmp_path, f"train.deepspeed={spec}", world_size=1)
    expected = own if value == "file" else recipes.folder() / "deepspeed" / f"{value}.json"  # installed with m2pt
    assert "fsdp" not in seen  # FSDP stays off
    assert Path(seen["deepspeed"]).resolve() == expected.resolve()


def test_deepspeed_missing_is_one_line_before_the_model_loads(train_recipe, tmp_path):
    if engines.importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here: the GPU script (.ci/gpu_engines.sh) checks it runs")
    result = m2pt("train", train_recipe, "train.deepspeed=zero3", "--output-dir", tmp_path / "run", check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "m2pt: error: train.deepspeed: 'zero3' needs DeepSpeed, which is not installed here "
        "(pip install deepspeed, on a machine with CUDA); or set train.deepspeed='' to train without it"
    )


def test_a_deepspeed_file_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 2")
    with pytest.raises(UserError, match=r"^train\.deepspeed: .*ds\.json is not valid JSON"):
        engines.deepspeed_config(str(bad))


def test_deepspeed_on_cpu_processes_is_refused(monkeypatch):
    """With DeepSpeed installed, a CPU launch would still train plain DDP (accelerate turns DeepSpeed
    on only off the CPU): refused in one line."""
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(UserError, match=r"^train\.deepspeed: DeepSpeed trains on GPUs; on CPU processes"):
        engines.trainer_arguments(False, "", "zero2", use_cpu=True)
    assert engines.trainer_arguments(False, "", "zero2", use_cpu=False)["deepspeed"].endswith("zero2.json")


def test_fsdp_and_deepspeed_together_are_refused(monkeypatch):
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(UserError, match="both set; choose one engine"):
        engines.trainer_arguments(True, "", "zero2", use_cpu=False)


# ----------------------------------------------------------------------------- multi-node


@pytest.mark.slow  # two torchrun launchers, one process each
def test_two_nodes_on_loopback_match_one_process(train_recipe, finished_run, tmp_path):
    """``torchrun --nnodes 2 --node_rank 0/1 --master_addr 127.0.0.1`` (gloo), each "node" with its
    own $M2PT_CACHE: the adapter one process trains, within the 2-process DDP tolerance (1e-5, see
    test_trainer.py::test_two_process_ddp_matches_one_process)."""
    port, run = free_port(), tmp_path / "two-nodes"
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
        cmd += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        cmd += ["-m", "m2pt_cli", "train", str(train_recipe), "train.per_device_batch_size=4", "--output-dir", str(run)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "M2PT_CACHE": str(tmp_path / f"cache-node{rank}")}
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "training on 2 processes: MULTI_CPU" in outputs[0][1]
    assert outputs[0][0].count("done: 8 steps") == 1 and "done:" not in outputs[1][0]  # the world's rank 0 reports
    single, nodes = adapter(finished_run), adapter(run)
    assert set(nodes) == set(single)
    for key in single:
        gap = (nodes[key] - single[key]).abs().max()
        assert torch.allclose(nodes[key], single[key], atol=1e-5, rtol=0), (key, gap)
