"""The instructblip backbone: query tokens before BOS, the Q-Former reads the instruction, refusals."""

from __future__ import annotations

import json

import pytest
import yaml

import m2pt_cli
from m2pt_cli.chat import question_prompt
from m2pt_cli.config import DataCfg, SourceCfg
from m2pt_cli.data.build import prepare
from m2pt_cli.errors import UserError
from tests.cases import images


@pytest.fixture(scope="module")
def blip(tiny_models, tmp_path_factory):
    from tests.cases import build_case

    case = build_case("instructblip", tmp_path_factory.mktemp("blip"), tiny_models)
    model, processor = m2pt_cli.load(case.recipe)
    return case, model, processor


def test_towers_are_the_vit_and_the_llm_decoder(blip):
    case, model, _ = blip
    vision, text = case.backbone.vision_tower(model.base), case.backbone.language_tower(model.base)
    assert list(vision.blocks) == list(model.base.vision_model.encoder.layers) and len(vision.blocks) == 3
    assert text.stack is model.base.language_model.model and len(text.blocks) == 4
    assert model.m2pt_config.vision_layers == [0, 1, 2]  # the Q-Former reads the last block's output
    state = model.adapter_state_dict()  # trainable: [projector, query_tokens]
    assert state["query_tokens"].shape == (1, 4, 32) and state["projector.weight"].shape == (64, 32)
    assert model.parameter_groups()["query_tokens"] == 4 * 32


def test_query_tokens_come_before_bos_without_labels(blip):
    case, _, processor = blip
    from m2pt_cli.data.encode import Encoder

    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dot."}]
    encoded = Encoder(processor, case.backbone, "plain", 128).encode(turns, "r")
    image_id = case.backbone.image_token_id(processor)
    assert encoded.input_ids[:4] == [image_id] * 4
    assert encoded.input_ids[4] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.decode(encoded.input_ids[5:]) == "What is it? A dot.</s>"
    assert all(label == -100 for label in encoded.labels[:5])


def test_qformer_reads_the_instruction_not_the_template(blip):
    case, _, processor = blip
    prompt = question_prompt(processor, case.backbone, "Is it red?", "vicuna_v1")
    assert "<image>" not in prompt and prompt.startswith("A chat between")
    inputs = case.backbone.build_inputs(processor, images(1), [prompt], ["Is it red?"])
    qformer_text = processor.qformer_tokenizer.decode(inputs["qformer_input_ids"][0], skip_special_tokens=True)
    assert qformer_text == "Is it red?"


def test_text_only_records_are_skipped_with_a_reason(blip, tmp_path):
    case, _, processor = blip
    records = [
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {
            "id": "i",
            "image": "img.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red"}],
        },
    ]
    images(1)[0].save(tmp_path / "img.png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = DataCfg(sources=[SourceCfg(format="llava_json", path=str(tmp_path / "data.json"))])
    train, _, report = prepare(data, processor, case.backbone, "plain", 0)
    assert len(train) == 1 and report.skipped == {"backbone instructblip needs an image in every record": 1}


def test_encoder_decoder_checkpoints_are_refused(tmp_path):
    from transformers import InstructBlipConfig, T5Config

    text = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    InstructBlipConfig(text_config=text.to_dict()).save_pretrained(tmp_path / "t5")
    recipe = tmp_path / "t5.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"backbone": "instructblip", "name_or_path": str(tmp_path / "t5")}}))
    with pytest.raises(UserError, match=r"encoder-decoder language model \(t5\).*Vicuna or OPT"):
        m2pt_cli.load(recipe)


def test_no_chat_template_is_a_clear_error(blip):
    case, _, processor = blip
    with pytest.raises(
        UserError, match="processor has no chat template; set model.chat_template to vicuna_v1 or plain"
    ):
        question_prompt(processor, case.backbone, "Is it red?", "processor")
