"""Export and load: round trip, size, refusal of wrong bases and damaged files, generate."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import m2pt_cli
from m2pt_cli.backbones._tiny import save_tiny_llava, tiny_llava_config
from m2pt_cli.errors import UserError
from tests.helpers import m2pt

QUESTION = "What digit is shown in this image?"


def digit_png(path):
    Image.new("RGB", (32, 32), "white").save(path)
    image = Image.open(path)
    image.paste((0, 0, 0), (12, 6, 20, 26))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "fp32"
    m2pt("export", finished_run, "--format", "safetensors", "--output", out)
    return out


def logits(model, processor, image_path):
    from m2pt_cli.backbones.llava import LlavaBackbone
    from tests.helpers import chat_inputs

    inputs = chat_inputs(LlavaBackbone(), processor, [Image.open(image_path).convert("RGB")], [QUESTION])
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_export_writes_only_trained_tensors(exported, finished_run):
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["adapter.safetensors", "m2pt_adapter.json", "recipe.yaml"]
    model, _ = m2pt_cli.load(finished_run / "config.yaml")
    expected = model.adapter_state_dict()
    state = load_file(str(exported / "adapter.safetensors"))
    assert set(state) == set(expected)
    assert all(state[k].shape == expected[k].shape for k in state)
    values = sum(t.numel() for t in state.values())
    assert (exported / "adapter.safetensors").stat().st_size <= values * 4 + 64 * 1024
    meta = json.loads((exported / "m2pt_adapter.json").read_text())
    assert meta["backbone"] == "llava" and meta["format_version"] == 1 and meta["m2pt_version"]
    assert meta["towers"]["vision"] == {"prompt_length": 2, "layers": [0, 1, 2], "width": 32, "total_layers": 4}
    assert meta["towers"]["text"]["layers"] == [0, 1, 2, 3]
    assert meta["trained_modules"] == ["projector"] and meta["dtype"] == "float32"
    assert meta["parameters"]["text_prompts"] == 4 * 2 * 64
    assert len(meta["sha256"]) == 64
    assert yaml.safe_load((exported / "recipe.yaml").read_text())["name"] == "tiny-train"


def test_round_trip_fp32_is_identical(exported, finished_run, tmp_path):
    image = digit_png(tmp_path / "d.png")
    in_memory, processor = m2pt_cli.load(finished_run / "config.yaml", adapter=finished_run / "adapter")
    loaded, _ = m2pt_cli.load(exported)
    assert torch.equal(logits(loaded, processor, image), logits(in_memory, processor, image))
    fresh, _ = m2pt_cli.load(finished_run / "config.yaml")
    assert not torch.equal(logits(fresh, processor, image), logits(loaded, processor, image))


def test_round_trip_bf16_within_rounding(finished_run, tmp_path):
    out = tmp_path / "bf16"
    m2pt("export", finished_run, "--dtype", "bfloat16", "--output", out)
    state = load_file(str(out / "adapter.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    image = digit_png(tmp_path / "d.png")
    full, processor = m2pt_cli.load(finished_run)
    half, _ = m2pt_cli.load(out)
    reference = full.adapter_state_dict()
    for key, value in half.adapter_state_dict().items():  # loaded back into fp32 parameters
        assert torch.equal(value, reference[key].to(torch.bfloat16).float()), key
    diff = (logits(full, processor, image) - logits(half, processor, image)).abs().max().item()
    assert 0 < diff < 0.05


def test_hf_format_has_a_model_card(finished_run, tmp_path):
    out = tmp_path / "hf"
    m2pt("export", finished_run, "--format", "hf", "--output", out)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert "held_out_accuracy_after" in card and "m2pt generate --adapter" in card
    assert "| vision | 2 | 0-2 (3 of 4) | 32 |" in card


def test_unknown_format_lists_the_known_ones(finished_run, tmp_path):
    result = m2pt("export", finished_run, "--format", "onnx", "--output", tmp_path / "x", check=False)
    assert result.returncode == 2
    assert "unknown export format 'onnx'" in result.stderr and "hf, safetensors" in result.stderr
    assert not (tmp_path / "x").exists()


def _other_base(tmp_path, **dims):
    return save_tiny_llava(tmp_path / "other", tiny_llava_config(**dims), seed=1)


@pytest.mark.parametrize(
    "dims, message",
    [
        ({"text_layers": 6}, "adapter was trained for text_total_layers = 4, this model has 6"),
        ({"text_width": 96}, "adapter was trained for text_width = 64, this model has 96"),
        ({"vision_width": 48}, "adapter was trained for vision_width = 32, this model has 48"),
    ],
)
def test_mismatched_base_is_refused(exported, tmp_path, dims, message):
    other = _other_base(tmp_path, **dims)
    with pytest.raises(UserError, match=message):
        m2pt_cli.load(exported, base=str(other))
    result = m2pt(
        "generate",
        "--adapter",
        exported,
        "--image",
        digit_png(tmp_path / "d.png"),
        "--prompt",
        "Hi",
        "--base-model",
        other,
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_projector_shape_mismatch_is_refused(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    state = load_file(str(broken / "adapter.safetensors"))
    state["projector.linear_1.weight"] = state["projector.linear_1.weight"][:, :16].contiguous()
    meta = json.loads((broken / "m2pt_adapter.json").read_text())
    from m2pt_cli.adapter import write_adapter

    write_adapter(
        broken, state, meta, extra_files={"recipe.yaml": (exported / "recipe.yaml").read_text()}, overwrite=True
    )
    with pytest.raises(
        UserError, match=r"adapter tensor projector.linear_1.weight has shape \(64, 16\), the model needs"
    ):
        m2pt_cli.load(broken)


def test_truncated_file_and_flipped_checksum_are_refused(exported, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(exported, truncated)
    data = (truncated / "adapter.safetensors").read_bytes()
    (truncated / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="its header describes [0-9,]+; the file is truncated or padded"):
        m2pt_cli.load(truncated)
    flipped = tmp_path / "flipped"
    shutil.copytree(exported, flipped)
    meta = json.loads((flipped / "m2pt_adapter.json").read_text())
    meta["sha256"] = ("0" if meta["sha256"][0] != "0" else "1") + meta["sha256"][1:]
    (flipped / "m2pt_adapter.json").write_text(json.dumps(meta))
    result = m2pt("export", flipped, "--output", tmp_path / "again", check=False)
    assert result.returncode == 2 and "checksum does not match" in result.stderr
    assert not (tmp_path / "again").exists()


def test_generate_prints_what_the_python_api_generates(exported, tmp_path):
    from m2pt_cli.backbones.llava import LlavaBackbone
    from tests.helpers import chat_inputs

    image = digit_png(tmp_path / "d.png")
    model, processor = m2pt_cli.load(exported)
    inputs = chat_inputs(LlavaBackbone(), processor, [Image.open(image).convert("RGB")], [QUESTION])
    tokens = model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    result = m2pt("generate", "--adapter", exported, "--image", image, "--prompt", QUESTION, "--max-new-tokens", "6")
    assert result.stdout.strip() == expected
    base = m2pt(
        "generate", "--adapter", exported, "--image", image, "--prompt", QUESTION, "--max-new-tokens", "6", "--base"
    )
    plain, _ = m2pt_cli.load(exported / "recipe.yaml", overrides=("prompts.vision.length=0", "prompts.text.length=0"))
    plain_tokens = plain.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
    plain_text = processor.tokenizer.decode(plain_tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert base.stdout.strip() == plain_text.strip()


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_an_adapter_of_another_format_version_is_refused(exported, tmp_path, version):
    """Only the format this m2pt writes is read: an older or newer file, a version as text, or none."""
    other = tmp_path / "other"
    shutil.copytree(exported, other)
    meta = json.loads((other / "m2pt_adapter.json").read_text())
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    (other / "m2pt_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=re.escape(f"adapter format {version!r}, this m2pt reads 1")):
        m2pt_cli.load(other)


def test_a_run_without_its_adapter_resolves_to_its_newest_checkpoint(finished_run, tmp_path):
    """A run folder stopped before its final adapter: the checkpoint with the highest step, compared as
    numbers (checkpoint-10 is newer than checkpoint-8), answers for it."""
    from m2pt_cli.adapter import find_adapter

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("adapter"))
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert len(steps) > 1
    shutil.copytree(run / f"checkpoint-{steps[-1]}", run / "checkpoint-10")
    newest = max([*steps, 10])
    assert find_adapter(run) == run / f"checkpoint-{newest}"
    assert find_adapter(run / "checkpoint-10") == run / "checkpoint-10"  # an adapter folder is itself


def test_two_exports_of_one_run_are_equal_byte_for_byte(finished_run, tmp_path):
    """Users compare checksums to know two adapters are the same: each file of six exports of one run,
    two by processes of their own, has the same bytes. (safetensors writes its metadata in hash-map
    order, a coin toss per write: six writes agree by chance once in 32.)"""
    names = [f"export-{k}" for k in range(6)]
    for k, name in enumerate(names):
        m2pt("export", finished_run, "--output", tmp_path / name, process=k < 2)
    first = sorted(p.name for p in (tmp_path / names[0]).iterdir())
    assert "adapter.safetensors" in first
    for name in names[1:]:
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == first
        for file in first:
            assert (tmp_path / name / file).read_bytes() == (tmp_path / names[0] / file).read_bytes(), (name, file)
