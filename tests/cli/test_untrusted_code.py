"""Files from strangers cannot run code or exhaust memory (issue #23, classes 1, 2 and 6).

Each payload leaves a marker file if it runs; every refusal asserts the marker never appears, and a
positive control shows the payload does run when the person at the keyboard allows it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

import m2pt_cli
from m2pt_cli.backbones.base import BackboneError
from m2pt_cli.errors import UserError
from tests.helpers import REPO, m2pt, refused

EVIL_CONFIG = """import pathlib
pathlib.Path({marker!r}).write_text("model code ran")
from transformers import LlavaConfig


class EvilConfig(LlavaConfig):
    pass
"""


def tower_source(tower: str, pretrained: str) -> SimpleNamespace:
    """The ``model`` keys ``create_visual`` reads."""
    return SimpleNamespace(vision_tower=tower, vision_pretrained=pretrained, vision_image_size=0, weights="pretrained")


def evil_model(tiny_llava_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny LLaVA with an ``auto_map`` whose config module writes ``marker`` when imported."""
    shutil.copytree(tiny_llava_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    return folder


def recipe_for(path: Path, model: Path, **model_keys) -> Path:
    recipe = {
        "model": {"backbone": "llava", "name_or_path": str(model), "dtype": "float32", **model_keys},
        "prompts": {"vision": {"length": 2}, "text": {"length": 2}},
        "data": {"sources": [{"format": "digits", "limit": 16}]},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def adapter_copy(finished_run: Path, folder: Path, **model_keys) -> Path:
    """The finished run's adapter, its recipe.yaml's ``model`` section changed by a stranger."""
    shutil.copytree(finished_run / "adapter", folder)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["model"].update(model_keys)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Where transformers copies a repository's code, away from the user's cache."""
    return {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "outside" / "marker"


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "digit.png"
    Image.new("RGB", (32, 32), "white").save(path)
    return path


def test_the_payload_runs_when_the_caller_allows_it(tiny_llava_dir, tmp_path, marker):
    """Control: the model code is live; ``trust_remote_code=True`` in Python runs it."""
    marker.parent.mkdir()
    model = evil_model(tiny_llava_dir, tmp_path / "model", marker)
    recipe = recipe_for(tmp_path / "r.yaml", model)
    code = f"import m2pt_cli; m2pt_cli.load({str(recipe)!r}, trust_remote_code=True)"
    env = {**os.environ, **isolated_env(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert marker.read_text() == "model code ran"


@pytest.mark.bad_input
def test_a_recipe_cannot_grant_model_code(tiny_llava_dir, tmp_path, marker):
    marker.parent.mkdir()
    model = evil_model(tiny_llava_dir, tmp_path / "model", marker)
    recipe = recipe_for(tmp_path / "r.yaml", model, trust_remote_code=True)
    refused(
        ("train", recipe, "--output-dir", tmp_path / "run"),
        marker.parent,
        "model.trust_remote_code",
        "--trust-remote-code",
    )
    refused(
        ("train", recipe_for(tmp_path / "plain.yaml", model), "model.trust_remote_code=true"),
        marker.parent,
        "--trust-remote-code",
    )
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_info_never_runs_model_code(tiny_llava_dir, tmp_path, marker):
    marker.parent.mkdir()
    model = evil_model(tiny_llava_dir, tmp_path / "model", marker)
    recipe = recipe_for(tmp_path / "r.yaml", model, trust_remote_code=True)
    result = m2pt("info", recipe, env=isolated_env(tmp_path))
    assert "text        4 layers x 64 wide" in result.stdout  # described from config.json alone
    assert not marker.exists()


@pytest.mark.bad_input
def test_an_adapter_cannot_grant_model_code(finished_run, tiny_llava_dir, tmp_path, marker, image):
    marker.parent.mkdir()
    model = evil_model(tiny_llava_dir, tmp_path / "model", marker)
    adapter = adapter_copy(finished_run, tmp_path / "adapter", name_or_path=str(model), trust_remote_code=True)
    args = ("generate", "--adapter", adapter, "--image", image, "--prompt", "What digit?")
    refused(args, marker.parent, "needs Python code from its repository", "--trust-remote-code")
    with pytest.raises(UserError, match="--trust-remote-code"):
        m2pt_cli.load(adapter)
    assert not marker.exists()


@pytest.mark.bad_input
def test_an_adapter_does_not_bring_its_own_base(finished_run, tiny_llava_dir, tmp_path, image):
    adapter = adapter_copy(finished_run, tmp_path / "adapter")
    shutil.copytree(tiny_llava_dir, adapter / "base")
    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = "./base"  # relative to the recipe file: inside the adapter
    (adapter / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = ("generate", "--adapter", adapter, "--image", image, "--prompt", "What digit?")
    refused(args, adapter, "is inside the adapter folder", "--base-model")
    refused(
        ("eval", "--bench", "demo", "--adapter", adapter, "--output-dir", tmp_path / "e"),
        adapter,
        "inside the adapter",
    )
    answer = m2pt(*args, "--base-model", adapter / "base", "--max-new-tokens", "2")  # named by the user: allowed
    assert answer.returncode == 0


EVIL_PICKLE_PROGRAM = "import pathlib; pathlib.Path({marker!r}).write_text('unpickled')"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (EVIL_PICKLE_PROGRAM.format(marker=str(self.marker)),))


def tower_folder(tmp_path: Path, marker: Path) -> Path:
    """An open_clip tower folder whose only checkpoint is a pickle that writes ``marker``."""
    from m2pt_cli.backbones._tiny import save_tiny_open_clip

    folder = save_tiny_open_clip(tmp_path / "tower")
    (folder / "open_clip_model.safetensors").unlink()
    (folder / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return folder


def test_the_tower_pickle_runs_when_unpickled(tmp_path, marker):
    """Control: the tower checkpoint is a live payload."""
    marker.parent.mkdir()
    folder = tower_folder(tmp_path, marker)
    pickle.loads((folder / "open_clip_pytorch_model.bin").read_bytes())  # noqa: S301 - the control itself
    assert marker.read_text() == "unpickled"


@pytest.mark.bad_input
def test_open_clip_towers_load_from_safetensors_only(tmp_path, marker):
    from m2pt_cli.backbones.openclip_vicuna import create_visual

    marker.parent.mkdir()
    folder = tower_folder(tmp_path, marker)
    source = tower_source(str(folder), "")
    with pytest.raises(BackboneError, match=r"holds no \.safetensors weights"):
        create_visual(source)
    checkpoint = folder / "open_clip_pytorch_model.bin"
    source = tower_source("ViT-S-32", str(checkpoint))
    with pytest.raises(BackboneError, match=r"not a \.safetensors file"):
        create_visual(source)
    assert not marker.exists()


def test_a_safetensors_tower_folder_loads_its_weights(tmp_path):
    """The refusal above is not a refusal of every folder: a safetensors tower loads its own weights."""
    import torch
    from safetensors.torch import load_file

    from m2pt_cli.backbones._tiny import save_tiny_open_clip
    from m2pt_cli.backbones.openclip_vicuna import create_visual

    folder = save_tiny_open_clip(tmp_path / "tower", seed=7)
    visual, _ = create_visual(tower_source(str(folder), ""))
    saved = load_file(str(folder / "open_clip_model.safetensors"))
    assert torch.equal(visual.conv1.weight, saved["visual.conv1.weight"])


@pytest.mark.bad_input
def test_yaml_aliases_do_not_blow_up_the_error(tmp_path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "description: &top\n" + "".join(f"  {line}\n" for line in lines) + "trainable: *top\n"
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(text)
    assert len(text) < 600  # expands to 9**9 = 387 million strings
    result = m2pt("info", recipe, check=False)
    assert result.returncode == 2 and len(result.stderr) < 400, result.stderr[:400]
    assert "description: expected a string, got {'a0': ['lol'" in result.stderr


PEAK_PROGRAM = """
import resource, sys
import m2pt_cli
from m2pt_cli.errors import UserError
try:
    m2pt_cli.load(sys.argv[1])
except UserError as exc:
    print(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "raised, expected",
    [
        (False, "prompts.text.length: 6000000 is over prompts.length_limit (1024)"),
        # a recipe that raises its own limit still meets the check of the tensors' shapes
        (True, "adapter.safetensors holds text_prompts of shape (4, 2, 64); this model needs (4, 6000000, 64)"),
    ],
    ids=["over-the-limit", "limit-raised"],
)
def test_an_adapter_claiming_millions_of_prompts_is_refused_before_allocation(finished_run, tmp_path, raised, expected):
    adapter = adapter_copy(finished_run, tmp_path / "adapter")
    positions = 6_000_000  # 4 layers x 6M x 64 floats: 6 GiB if allocated
    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    recipe["prompts"]["text"]["length"] = positions
    if raised:
        recipe["prompts"]["length_limit"] = positions
    (adapter / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    meta = json.loads((adapter / "m2pt_adapter.json").read_text())
    meta["m2pt_config"]["text_length"] = positions
    (adapter / "m2pt_adapter.json").write_text(json.dumps(meta))
    result = subprocess.run(
        [sys.executable, "-c", PEAK_PROGRAM, str(adapter)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    message, peak = result.stdout.strip().splitlines()
    assert expected in message, message
    assert int(peak) < 2 * 2**30, f"peak resident memory {int(peak) / 2**30:.2f} GiB"


@pytest.mark.bad_input
@pytest.mark.parametrize("state", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_never_unpickles_checkpoint_state(finished_run, train_recipe, tmp_path, marker, state):
    marker.parent.mkdir()
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for later in ("checkpoint-6", "checkpoint-8"):
        shutil.rmtree(run / later)
    (run / "checkpoint-4" / state).write_bytes(pickle.dumps(_Payload(marker)))
    result = m2pt("train", train_recipe, "--resume", run, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith(f"m2pt: error: {run / 'checkpoint-4'}: a state file holds pickled objects")
    assert not marker.exists()


LOADING_SCRIPT = """import pathlib
pathlib.Path({marker!r}).write_text("loading script ran")
import datasets


class Evil(datasets.GeneratorBasedBuilder):
    def _info(self):
        return datasets.DatasetInfo()
"""


@pytest.mark.bad_input
def test_data_sets_never_run_loading_scripts(tiny_llava_dir, tmp_path, marker):
    marker.parent.mkdir()
    script = tmp_path / "evil" / "evil.py"
    script.parent.mkdir()
    script.write_text(LOADING_SCRIPT.format(marker=str(marker)))
    recipe = recipe_for(tmp_path / "r.yaml", tiny_llava_dir)
    source = "data.sources=[{format: hf, path: " + str(script) + "}]"
    result = m2pt("train", recipe, source, "--output-dir", tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]  # after the model's loading bar
    assert last.startswith("m2pt: error: data.sources[0].path: cannot load") and "scripts" in last, last
    assert not marker.exists()
