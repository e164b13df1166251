"""A backbone from another package, registered through the ``m2pt.backbones`` entry-point group,
goes through the same commands as the built-in ones, with a recipe key of its own (docs/plugins.md: "Adding
a backbone")."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import m2pt

pytestmark = pytest.mark.slow  # an installed plugin package: real processes

PLUGIN = '''
"""A third-party backbone: LLaVA that also lets recipes train the LLM's final norm and choose the
vision block the projector reads (a ``model`` key of its own)."""
from m2pt_cli.backbones.base import ModelKey
from m2pt_cli.backbones.llava import LlavaBackbone


class AcmeLlava(LlavaBackbone):
    trainable_modules = (*LlavaBackbone.trainable_modules, "final_norm")
    model_keys = (
        ModelKey(
            "feature_layer", None, "vision block whose output the projector reads (null: the checkpoint's)",
            type=int | None,
        ),
    )

    def load(self, source, device="cpu"):
        loaded = super().load(source, device)
        self._feature_layer(loaded.model, source)
        return loaded

    def build_empty(self, source):
        return self._feature_layer(super().build_empty(source), source)

    @staticmethod
    def _feature_layer(model, source):
        if source.feature_layer is not None:
            model.config.vision_feature_layer = source.feature_layer
        return model

    def module(self, model, name):
        if name == "final_norm":
            return model.model.language_model.norm
        return super().module(model, name)
'''


def install_plugin(root):
    """What ``pip install`` of a package declaring the entry point leaves on the path."""
    (root / "acme_m2pt.py").write_text(PLUGIN)
    dist = root / "acme_m2pt-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-m2pt\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[m2pt.backbones]\nacme = acme_m2pt:AcmeLlava\n")
    return {"PYTHONPATH": str(root)}


def acme_recipe(tmp_path, tiny_llava_dir, name="acme", **model):
    recipe = {
        "model": {"backbone": "acme", "name_or_path": str(tiny_llava_dir), "dtype": "float32", **model},
        "prompts": {"vision": {"length": 2}, "text": {"length": 2}},
        "trainable": ["projector", "final_norm"],
        "data": {"sources": [{"format": "digits", "limit": 24}], "eval_size": 4},
        "train": {
            "max_steps": 2,
            "global_batch_size": 4,
            "per_device_batch_size": 4,
            "precision": "fp32",
            "save_steps": 2,
            "eval_samples": 2,
            "eval_max_new_tokens": 2,
            "gradient_checkpointing": False,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_third_party_backbone_trains_and_generates(tmp_path, tiny_llava_dir):
    env = install_plugin(tmp_path)
    path = acme_recipe(tmp_path, tiny_llava_dir, feature_layer=-3)  # the tiny CLIP has 4 blocks

    info = json.loads(m2pt("info", path, "--json", env=env).stdout)
    assert info["backbone"] == "acme" and info["trainable"]["final_norm"] == 64
    assert info["model_keys"] == {"feature_layer": -3}
    assert info["vision"]["prompt_layers"] == [0, 1]  # the backbone read its key: blocks 2 and 3 are never read

    m2pt("train", path, "--output-dir", tmp_path / "run", env=env)
    meta = json.loads((tmp_path / "run" / "adapter" / "m2pt_adapter.json").read_text())
    assert meta["m2pt_config"]["backbone"] == "acme" and "final_norm" in meta["m2pt_config"]["trainable"]
    assert meta["m2pt_config"]["vision_layers"] == [0, 1]
    recorded = yaml.safe_load((tmp_path / "run" / "adapter" / "recipe.yaml").read_text())
    assert recorded["model"]["feature_layer"] == -3

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(image)
    # the adapter's recipe.yaml brings the key back: without it the model would prompt blocks 0-2, not 0-1
    args = ("generate", "--adapter", tmp_path / "run", "--image", image, "--prompt", "Digit?", "--max-new-tokens", "2")
    assert m2pt(*args, env=env).returncode == 0

    typo = m2pt("info", path, "model.backbone=acm", env=env, check=False)
    assert typo.returncode == 2 and "did you mean 'acme'?" in typo.stderr
    missing = m2pt("info", path, check=False)  # the plugin is not installed here
    assert missing.returncode == 2 and "unknown backbone 'acme'" in missing.stderr


def test_third_party_backbone_owns_its_model_key(tmp_path, tiny_llava_dir):
    env = install_plugin(tmp_path)
    path = acme_recipe(tmp_path, tiny_llava_dir)

    shown = m2pt("info", path, "model.feature_layer=-3", env=env).stdout  # an override of the plugin's own key
    assert "            feature_layer: -3\n" in shown
    assert "prompts: 2 per layer in 2 layers (0,1)" in shown
    default = json.loads(m2pt("info", path, "--json", env=env).stdout)
    assert default["model_keys"] == {"feature_layer": None} and default["vision"]["prompt_layers"] == [0, 1, 2]

    typo = m2pt("info", path, "model.feature_layr=-3", env=env, check=False)
    assert typo.returncode == 2 and "unknown key 'model.feature_layr'; did you mean 'feature_layer'?" in typo.stderr
    in_file = m2pt("info", acme_recipe(tmp_path, tiny_llava_dir, "typo", feature_layr=-3), env=env, check=False)
    assert (
        in_file.returncode == 2 and "model.feature_layr: unknown key; did you mean 'feature_layer'?" in in_file.stderr
    )
    wrong_type = m2pt("info", path, "model.feature_layer=last", env=env, check=False)
    assert (
        wrong_type.returncode == 2
        and "model.feature_layer: expected an integer or null, got 'last'" in wrong_type.stderr
    )

    other = m2pt(
        "info",
        acme_recipe(tmp_path, tiny_llava_dir, "set", feature_layer=-3),
        "model.backbone=llava",
        env=env,
        check=False,
    )
    assert other.returncode == 2
    assert "model.feature_layer: backbone 'llava' does not read it; remove the key or use backbone acme" in other.stderr
