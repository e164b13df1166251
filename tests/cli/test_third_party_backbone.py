"""A backbone from another package, registered through the ``m2pt.backbones`` entry-point group,
goes through the same commands as the built-in ones (README: "Adding a backbone")."""

from __future__ import annotations

import json

import yaml

from tests.helpers import m2pt

PLUGIN = '''
"""A third-party backbone: LLaVA that also lets recipes train the LLM's final norm."""
from backbones.llava import LlavaBackbone


class AcmeLlava(LlavaBackbone):
    trainable_modules = (*LlavaBackbone.trainable_modules, "final_norm")

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


def test_third_party_backbone_trains_and_generates(tmp_path, tiny_llava_dir):
    env = install_plugin(tmp_path)
    recipe = {
        "model": {"backbone": "acme", "name_or_path": str(tiny_llava_dir), "dtype": "float32"},
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
    path = tmp_path / "acme.yaml"
    path.write_text(yaml.safe_dump(recipe))

    info = json.loads(m2pt("info", path, "--json", env=env).stdout)
    assert info["backbone"] == "acme" and info["trainable"]["final_norm"] == 64

    m2pt("train", path, "--output-dir", tmp_path / "run", env=env)
    meta = json.loads((tmp_path / "run" / "adapter" / "m2pt_adapter.json").read_text())
    assert meta["m2pt_config"]["backbone"] == "acme" and "final_norm" in meta["m2pt_config"]["trainable"]

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(image)
    args = ("generate", "--adapter", tmp_path / "run", "--image", image, "--prompt", "Digit?", "--max-new-tokens", "2")
    assert m2pt(*args, env=env).returncode == 0

    typo = m2pt("info", path, "model.backbone=acm", env=env, check=False)
    assert typo.returncode == 2 and "did you mean 'acme'?" in typo.stderr
    missing = m2pt("info", path, check=False)  # the plugin is not installed here
    assert missing.returncode == 2 and "unknown backbone 'acme'" in missing.stderr
