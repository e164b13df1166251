"""M²PT on a real pretrained LLM: SmolLM2-135M-Instruct from its GGUF file (real weights, a real
byte-level BPE tokenizer, the ChatML template, end of turn ``<|im_end|>``, which is not ``</s>``).

The vision tower is a seeded random open_clip ViT-S/32: no pretrained ViT ships in any package.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import yaml
from PIL import Image

from m2pt_cli import gguf_files
from m2pt_cli.backbones.openclip_vicuna import OpenClipVicunaProcessor
from m2pt_cli.chat import end_of_turn, question_prompt
from m2pt_cli.data.encode import Encoder
from m2pt_cli.errors import UserError
from m2pt_cli.registry import BACKBONES
from tests.helpers import greedy_without_cache

pytestmark = pytest.mark.slow  # the real SmolLM2 weights, converted from GGUF

IM_END = "<|im_end|>"
# What the reply text of each template starts with (LLaVA's and InstructBLIP's put a space before it).
REPLY_PREFIX = {"processor": "", "vicuna_v1": " ", "plain": " "}


@pytest.fixture(scope="module")
def smol_folder(smollm2_gguf):
    return gguf_files.hf_folder(str(smollm2_gguf))


@pytest.fixture()
def processor(smol_folder):
    from transformers import AutoTokenizer

    return OpenClipVicunaProcessor(AutoTokenizer.from_pretrained(smol_folder), transform=None, tokens_per_image=4)


@pytest.fixture(scope="module")
def backbone():
    return BACKBONES.get("openclip_vicuna")


def test_the_real_tokenizer_ends_a_turn_with_its_own_special_token(processor):
    tokenizer = processor.tokenizer
    assert tokenizer.eos_token == IM_END and "</s>" not in tokenizer.all_special_tokens
    for template in REPLY_PREFIX:
        assert end_of_turn(processor, template) == IM_END


def test_processor_means_the_llms_own_chat_template(processor, backbone):
    rendered = question_prompt(processor, backbone, "What digit is this?", "processor")
    reference = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat digit is this?"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == reference
    assert rendered.endswith("<|im_start|>assistant\n") and "USER:" not in rendered


@pytest.mark.parametrize("template", sorted(REPLY_PREFIX))
def test_labels_cover_exactly_the_answer_and_its_end_of_turn_token(processor, backbone, template):
    tokenizer = processor.tokenizer
    conversation = [{"from": "human", "value": "<image>\nWhat digit is this?"}, {"from": "gpt", "value": "7"}]
    encoded = Encoder(processor, backbone, template, max_length=256).encode(conversation, "r0")
    labelled = [(i, label) for i, label in enumerate(encoded.labels) if label != -100]
    positions = [i for i, _ in labelled]
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # one contiguous reply
    expected = tokenizer(REPLY_PREFIX[template] + "7", add_special_tokens=False)["input_ids"]
    expected.append(tokenizer.convert_tokens_to_ids(IM_END))
    assert [label for _, label in labelled] == expected
    assert [encoded.input_ids[i] for i in positions] == expected
    # nothing the template writes after the end-of-turn token (ChatML's newline) is learned
    assert all(label == -100 for label in encoded.labels[positions[-1] + 1 :])


def test_a_template_whose_turn_ends_in_plain_text_is_refused(processor, backbone):
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    odd = OpenClipVicunaProcessor(tokenizer, transform=None, tokens_per_image=4)
    with pytest.raises(UserError, match=r"ends an assistant turn with '</s>', which is not a special token"):
        Encoder(odd, backbone, "processor", max_length=256)


def test_an_llm_without_a_chat_template_is_refused_under_processor(processor, backbone):
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.chat_template = None
    bare = OpenClipVicunaProcessor(tokenizer, transform=None, tokens_per_image=4)
    with pytest.raises(UserError, match="has no chat template; set model.chat_template to vicuna_v1 or plain"):
        Encoder(bare, backbone, "processor", max_length=256)
    assert end_of_turn(bare, "vicuna_v1") == IM_END  # m2pt's templates need none


@pytest.mark.slow
def test_the_converted_folder_is_the_gguf_model_and_is_made_once(smollm2_gguf, smol_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    direct = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(smol_folder)
    tokenizer = AutoTokenizer.from_pretrained(smol_folder)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)
    stamp = os.stat(smol_folder / "model.safetensors").st_mtime_ns
    assert gguf_files.hf_folder(str(smollm2_gguf)) == smol_folder
    assert os.stat(smol_folder / "model.safetensors").st_mtime_ns == stamp


@pytest.mark.slow
def test_greedy_answers_on_the_real_llm_stop_at_the_end_of_turn(smollm2_gguf, tmp_path):
    """The pretrained LLM behind a random tower still answers a plain question, and decoding stops at
    ``<|im_end|>``: the answer equals cache-free greedy decoding up to that token."""
    import m2pt_cli

    recipe = {
        "model": {
            "backbone": "openclip_vicuna",
            "name_or_path": str(smollm2_gguf),
            "vision_tower": "ViT-S-32",
            "vision_image_size": 64,
            "dtype": "float32",
        },
        "prompts": {"vision": {"length": 0}, "text": {"length": 0}},
    }
    path = tmp_path / "smol.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = m2pt_cli.load(path)
    image = Image.new("RGB", (32, 32), "white")
    question = "What is the capital of France?"
    answer = loaded.answer([image], [question], max_new_tokens=48)[0]
    assert "Paris" in answer and "<|im" not in answer
    inputs = loaded.backbone.build_inputs(loaded.processor, [image], [loaded.prompt(question)], [question])
    eot = loaded.processor.tokenizer.convert_tokens_to_ids(IM_END)
    reference = greedy_without_cache(loaded.model, dict(inputs), 48, eot)
    assert reference[-1] == eot and len(reference) < 48  # it ended by itself, well before the limit
    assert answer == loaded.processor.tokenizer.decode(reference, skip_special_tokens=True)
