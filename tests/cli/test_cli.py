"""The ``m2pt`` command: help texts, recipes listing, info figures against a hand count, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from m2pt_cli import __version__
from m2pt_cli.cli import SUBCOMMANDS, cli
from tests.conftest import REPO
from tests.helpers import m2pt


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_version():
    assert run("--version").output.strip() == f"m2pt, version {__version__}"


def test_help_does_not_import_torch():
    code = (
        "import sys; from m2pt_cli.cli import main; sys.argv=['m2pt','--help']\ntry: main()\nexcept SystemExit: pass\n"
    )
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_recipes_lists_one_line_each():
    lines = run("recipes").output.strip().splitlines()
    assert any(line.startswith("demo ") and "llava" in line and "./demo/model" in line for line in lines)
    assert any(line.startswith("llava ") and "llava-hf/llava-1.5-7b-hf" in line for line in lines)
    assert any(line.startswith("openclip_vicuna ") and "lmsys/vicuna-7b-v1.3" in line for line in lines)
    assert any(line.startswith("instructblip ") and "instructblip-vicuna-7b" in line for line in lines)
    assert lines[-1] == f"(files in {REPO / 'recipes'})"  # the checkout's folder, through the editable install


def _hand_count_tiny(vision=(4, 32), text=(4, 64), nv=3, nt=3, vision_layers=3, text_layers=4):
    """Trainable parameters of the tiny LLaVA counted by hand from its dimensions."""
    dv, dt = vision[1], text[1]
    projector = (dv * dt + dt) + (dt * dt + dt)  # linear_1 + linear_2, with biases
    return vision_layers * nv * dv, text_layers * nt * dt, projector


def test_info_matches_a_hand_count(tiny_recipe):
    result = run("info", str(tiny_recipe), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    vp, tp, proj = _hand_count_tiny()
    assert info["trainable"] == {"vision_prompts": vp, "text_prompts": tp, "projector": proj}
    assert info["vision"] == {
        "layers": 4,
        "width": 32,
        "prompt_length": 3,
        "prompt_layers": [0, 1, 2],
        "unused_layers": [3],
    }
    assert info["text"]["prompt_layers"] == [0, 1, 2, 3]
    text = run("info", str(tiny_recipe)).output
    assert "layer 3 left out" in text
    assert f"{vp + tp + proj:,}" in text


def test_info_overrides(tiny_recipe):
    info = json.loads(
        run("info", str(tiny_recipe), "--json", "prompts.text.length=5", "prompts.text.layers=1-2").output
    )
    assert info["trainable"]["text_prompts"] == 2 * 5 * 64
    assert info["text"]["prompt_layers"] == [1, 2]


def test_info_on_a_7b_llava_config_without_weights(tmp_path):
    """The paper's shapes: CLIP ViT-L (24 x 1024) + a 7B Llama (32 x 4096), config only, meta device."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064
    )
    LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000).save_pretrained(tmp_path / "llava7b")
    recipe = tmp_path / "big.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "llava7b")}}))
    info = json.loads(run("info", str(recipe), "--json").output)
    assert info["trainable"]["vision_prompts"] == 23 * 10 * 1024  # layer 23 is never read
    assert info["trainable"]["text_prompts"] == 32 * 10 * 4096
    assert info["trainable"]["projector"] == (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert not (tmp_path / "llava7b" / "model.safetensors").exists()
    # prompts alone are the paper's 1.55M; llava-1.5's two-layer projector brings the share to ~0.3 %
    assert 0.2 < info["trainable_percent"] < 0.4


def _vicuna_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )


def test_info_on_the_papers_base_without_weights(tmp_path):
    """recipes/openclip_vicuna.yaml with a Vicuna-7B-shaped config: the paper's 5.75M, 0.08 %."""
    _vicuna_7b_config().save_pretrained(tmp_path / "vicuna")
    args = [f"model.name_or_path={tmp_path / 'vicuna'}", "model.projector_weights="]
    info = json.loads(run("info", str(REPO / "recipes" / "openclip_vicuna.yaml"), "--json", *args).output)
    trainable = info["trainable"]
    assert trainable["vision_prompts"] == 23 * 10 * 1024  # ViT-L/14 block 23 is never read
    assert trainable["text_prompts"] == 32 * 10 * 4096
    assert trainable["projector"] == 1024 * 4096 + 4096  # LLaVA v1.3's linear stage-1 projector
    assert 0.08 < info["trainable_percent"] < 0.09


def test_info_on_instructblip_vicuna_7b_without_weights(tmp_path):
    from transformers import InstructBlipConfig

    InstructBlipConfig(text_config=_vicuna_7b_config().to_dict()).save_pretrained(tmp_path / "blip")
    args = [f"model.name_or_path={tmp_path / 'blip'}"]
    info = json.loads(run("info", str(REPO / "recipes" / "instructblip.yaml"), "--json", *args).output)
    assert info["trainable"]["vision_prompts"] == 39 * 10 * 1408  # EVA ViT-g: the Q-Former reads the last block
    assert info["trainable"]["text_prompts"] == 32 * 10 * 4096
    assert info["trainable"]["projector"] == 768 * 4096 + 4096  # language_projection


@pytest.mark.parametrize(
    "args, message",
    [
        (["prompts.txt.length=3"], "unknown key 'prompts.txt'; did you mean 'text'?"),
        (["prompts.text.layers=0-9"], "prompts.text.layers: layer 4 is out of range"),
        (["model.backbone=lava"], "unknown backbone 'lava'; did you mean 'llava'?"),
        (
            ["trainable=[projektor]"],
            "trainable: 'projektor' is not a module of backbone 'llava'; did you mean 'projector'?",
        ),
        (["model.name_or_path=/no/such/folder"], "model.name_or_path: folder '/no/such/folder' does not exist"),
    ],
)
def test_info_errors_are_one_line_exit_2(tiny_recipe, args, message):
    result = m2pt("info", tiny_recipe, *args, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_an_internal_error_names_the_cause_below_a_line_ending_with_a_colon(monkeypatch):
    """torch.compile's failures read ``backend='inductor' raised:`` with the cause on the next line."""
    from m2pt_cli import environment

    def broken():
        raise RuntimeError("backend='inductor' raised:\n\nCppCompileError: C++ compile error\n\nCommand: g++ ...")

    monkeypatch.setattr(environment, "collect", broken)
    result = m2pt("env", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "m2pt: internal error: RuntimeError: backend='inductor' raised: CppCompileError: C++ compile error "
        "(rerun with --debug)"
    )
