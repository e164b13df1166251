"""What every backbone promises the core, checked on each tiny model: training token ids are the
generation inputs' token ids, labels cover exactly the replies, image inputs match."""

from __future__ import annotations

import pytest
import yaml

import m2pt_cli
from m2pt_cli.chat import assistant_spans, end_of_turn, instruction, question_prompt, to_messages
from m2pt_cli.data.encode import Encoder
from m2pt_cli.errors import UserError
from tests.cases import QUESTIONS, images

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is it?"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "And the square?"},
    {"from": "gpt", "value": "White."},
]


def test_placed_tokens_are_what_build_inputs_gives(case):
    _, processor = m2pt_cli.load(case.recipe)
    backbone = case.backbone
    messages = to_messages(CONVERSATION, image_parts=backbone.image_in_text)
    text, _ = assistant_spans(processor, messages, case.template, end_of_turn(processor, case.template))
    built = backbone.build_inputs(processor, images(1), [text], [instruction(CONVERSATION)])
    ids = backbone.place_image_tokens(processor, processor.tokenizer(text)["input_ids"])
    assert ids == built["input_ids"][0].tolist()
    assert ids.count(backbone.image_token_id(processor)) == case.tokens_per_image


def test_labels_are_the_replies_and_their_end_of_turn(case):
    _, processor = m2pt_cli.load(case.recipe)
    encoded = Encoder(processor, case.backbone, case.template, 512).encode(CONVERSATION, "r")
    image_id = case.backbone.image_token_id(processor)
    labelled = [t for t in encoded.labels if t != -100]
    assert image_id not in labelled
    runs, current = [], []
    for label in encoded.labels + [-100]:
        if label == -100 and current:
            runs.append(processor.tokenizer.decode(current))
            current = []
        elif label != -100:
            current.append(label)
    end = processor.tokenizer.eos_token
    assert [r.strip() for r in runs] == [f"Red.{end}", f"White.{end}"]


def test_image_inputs_match_build_inputs(case):
    _, processor = m2pt_cli.load(case.recipe)
    backbone = case.backbone
    texts = [question_prompt(processor, backbone, q, case.template) for q in QUESTIONS]
    built = backbone.build_inputs(processor, images(2), texts, QUESTIONS)
    alone = backbone.image_inputs(processor, images(2), QUESTIONS)
    assert set(alone) <= set(built) and "pixel_values" in alone
    for key, value in alone.items():
        assert value.shape == built[key].shape and (value == built[key]).all(), key


@pytest.mark.parametrize(
    "backbone, checkpoint, message",
    [
        (
            "instructblip",
            "llava",
            "is a 'llava' checkpoint; backbone instructblip takes instructblip; use model.backbone: llava",
        ),
        (
            "llava",
            "instructblip",
            "is a 'instructblip' checkpoint; backbone llava takes llava; use model.backbone: instructblip",
        ),
        ("openclip_vicuna", "llava", "is a 'llava' checkpoint; backbone openclip_vicuna takes a language model alone"),
    ],
)
def test_a_checkpoint_of_another_family_is_refused(tiny_models, tmp_path, backbone, checkpoint, message):
    """Never a model whose weights silently stay random because the checkpoint was of another kind."""
    model = {"backbone": backbone, "name_or_path": str(tiny_models[checkpoint])}
    if backbone == "openclip_vicuna":
        model["vision_tower"] = str(tiny_models["openclip_vicuna"] / "vit")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    with pytest.raises(UserError, match=f"model.name_or_path: .* {message}"):
        m2pt_cli.load(path)
