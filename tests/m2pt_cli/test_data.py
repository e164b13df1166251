"""Data: label masking, truncation, sources (LLaVA JSON, parquet, digits), bad records, mixing."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from transformers import AutoProcessor

from m2pt_cli.backbones.llava import LlavaBackbone
from m2pt_cli.config import DataCfg, SourceCfg
from m2pt_cli.data.build import prepare
from m2pt_cli.data.collate import TrainCollator
from m2pt_cli.data.encode import Encoder
from m2pt_cli.errors import UserError

BACKBONE = LlavaBackbone()
IMAGE_TOKENS = 16  # 32 px / patch 8 -> 4 x 4 patches (CLS dropped)
CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dot."}]


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


def encoder(processor, max_length=512):
    return Encoder(processor, BACKBONE, "processor", max_length)


def labeled_text(processor, encoded) -> str:
    return processor.tokenizer.decode([t for t in encoded.labels if t != -100])


def test_labels_cover_only_the_assistant_reply_and_its_end_of_turn(processor):
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    enc = encoder(processor).encode(turns, "r1")
    text = processor.tokenizer.decode(enc.input_ids)
    assert text == "<s>USER: " + "<image>" * IMAGE_TOKENS + "\nWhat is it? ASSISTANT: A cat.</s>"
    assert labeled_text(processor, enc) == " A cat.</s>"
    first = enc.labels.index(next(t for t in enc.labels if t != -100))
    assert processor.tokenizer.decode(enc.input_ids[:first]).endswith("ASSISTANT:")
    assert all(t != -100 for t in enc.labels[first:])  # one contiguous block to the end


def test_multi_turn_labels_every_reply(processor):
    turns = [
        {"from": "human", "value": "<image>\nColour?"},
        {"from": "gpt", "value": "Red"},
        {"from": "human", "value": "Shape?"},
        {"from": "gpt", "value": "Round"},
    ]
    enc = encoder(processor).encode(turns, "r2")
    assert labeled_text(processor, enc) == " Red</s> Round</s>"
    ids, labels = enc.input_ids, enc.labels
    blocks, current = [], []
    for i, label in enumerate(labels):
        if label != -100:
            current.append(ids[i])
        elif current:
            blocks.append(current)
            current = []
    blocks.append(current)
    assert [processor.tokenizer.decode(b) for b in blocks] == [" Red</s>", " Round</s>"]


def test_sample_without_image(processor):
    enc = encoder(processor).encode([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "t")
    assert processor.tokenizer.decode(enc.input_ids) == "<s>USER: Hi ASSISTANT: Hello</s>"
    assert labeled_text(processor, enc) == " Hello</s>"


def test_truncation_is_counted_after_image_expansion(processor):
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A long answer here"}]
    full = encoder(processor).encode(turns, "t")
    assert len(full.input_ids) > IMAGE_TOKENS
    cut = encoder(processor, max_length=len(full.input_ids) - 5).encode(turns, "t")
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 5
    assert labeled_text(processor, cut) == " A long answer "  # "here" and "</s>" cut
    assert encoder(processor, max_length=12).encode(turns, "t") is None  # would cut the image tokens


def test_training_prompt_matches_the_generation_prompt(processor):
    turns = [{"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "7"}]
    enc = encoder(processor)
    prompt, answer = enc.prompt_text(turns, "x")
    gen = BACKBONE.build_inputs(processor, [Image.new("RGB", (32, 32))], [prompt])["input_ids"][0].tolist()
    full = enc.encode(turns, "x")
    assert answer == "7"
    assert full.input_ids[: len(gen)] == gen
    assert all(label == -100 for label in full.labels[: len(gen)])


def png(colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_llava_json(folder):
    images = folder / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png())
    (images / "text.png").write_text("not an image")
    records = [
        {
            "id": "good",
            "image": "good.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
        },
        {"id": "textonly", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {
            "id": "missing",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "notimage",
            "image": "text.png",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "noconv", "image": "good.png"},
        {
            "id": "twoplaceholders",
            "image": "good.png",
            "conversations": [{"from": "human", "value": "<image>\n<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "noreply", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {
            "id": "noplaceholder",
            "image": "good.png",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        },
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path, images


def test_bad_records_are_skipped_and_counted(processor, tmp_path):
    path, images = write_llava_json(tmp_path)
    cfg = DataCfg(sources=[SourceCfg(format="llava_json", path=str(path), image_folder=str(images))])
    train, held_out, report = prepare(cfg, processor, BACKBONE, "processor", seed=0)
    assert sorted(train["id"]) == ["good", "textonly"] and held_out is None
    assert report.records == 8 and report.kept == 2
    assert report.skipped == {
        "image file missing": 1,
        "image unreadable": 1,
        "no 'conversations' list": 1,
        "more <image> placeholders than images": 1,
        "no assistant reply": 1,
        "an image but no <image> placeholder": 1,
    }
    assert report.skipped_ids == ["missing", "notimage", "noconv", "twoplaceholders", "noreply"]


def test_bad_records_stop_training_under_the_error_policy(processor, tmp_path):
    path, images = write_llava_json(tmp_path)
    cfg = DataCfg(
        sources=[SourceCfg(format="llava_json", path=str(path), image_folder=str(images))], on_bad_record="error"
    )
    with pytest.raises(UserError, match=r"data.sources\[0\]: record missing: image file missing"):
        prepare(cfg, processor, BACKBONE, "processor", seed=0)


def test_hf_parquet_source_mixing_and_held_out_split(processor, tmp_path):
    import datasets

    rows = {
        "image": [{"bytes": png((i * 20, 0, 0)), "path": None} for i in range(10)],
        "question": [f"Shade {i}?" for i in range(10)],
        "answer": [str(i) for i in range(10)],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "qa.parquet"))
    cfg = DataCfg(
        sources=[
            SourceCfg(format="digits", limit=40, weight=1.0),
            SourceCfg(format="hf", path=str(tmp_path / "qa.parquet"), weight=1.0),
        ],
        eval_size=0.2,
    )
    train, held_out, report = prepare(cfg, processor, BACKBONE, "processor", seed=0)
    assert report.records == 50 and report.held_out == 8 + 2
    assert len(held_out) == 10
    assert any(i.startswith("digits-") for i in train["id"]) and any(not i.startswith("digits-") for i in train["id"])
    assert set(train["id"]).isdisjoint(held_out["id"])
    qa = [c for c in train["conversations"] if c[0]["value"].startswith("<image>\nShade")]
    assert qa and qa[0][1]["from"] == "gpt"


def test_unreadable_image_at_load_time_follows_the_policy(processor, tmp_path):
    good = png()
    rows = [
        {
            "id": "ok",
            "image": {"bytes": good, "path": None},
            "input_ids": [1, 2, 3],
            "labels": [-100, 2, 3],
            "conversations": CONV,
        },
        {
            "id": "cut",
            "image": {"bytes": good[: len(good) // 2], "path": None},
            "input_ids": [1, 2],
            "labels": [-100, 2],
            "conversations": CONV,
        },
    ]
    skip = TrainCollator(processor, BACKBONE, "skip")
    batch = skip(rows)
    assert batch["input_ids"].shape[0] == 1 and skip.dropped == 1 and batch["pixel_values"].shape[0] == 1
    with pytest.raises(UserError, match="record cut: cannot read its image"):
        TrainCollator(processor, BACKBONE, "error")(rows)


def test_collator_pads_right_and_masks_padding(processor):
    rows = [
        {"id": "a", "image": None, "input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
        {"id": "b", "image": None, "input_ids": [1, 7], "labels": [-100, 7]},
    ]
    batch = TrainCollator(processor, BACKBONE)(rows)
    pad = processor.tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert "pixel_values" not in batch


def qa_parquet(folder, n=10):
    import datasets

    rows = {
        "image": [{"bytes": png((i * 20, 0, 0)), "path": None} for i in range(n)],
        "question": [f"Shade {i}?" for i in range(n)],
        "answer": [str(i) for i in range(n)],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    path = folder / "qa.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.mark.parametrize("pair", [("llava_json", "hf"), ("llava_json", "digits"), ("hf", "digits")])
def test_every_pair_of_formats_mixes(processor, tmp_path, pair):
    """docs/training.md mixes formats in one data.sources list; each source kept its own image feature, so
    llava_json with any other stopped with "The features can't be aligned"."""
    path, images = write_llava_json(tmp_path)
    sources = {
        "llava_json": SourceCfg(format="llava_json", path=str(path), image_folder=str(images)),
        "hf": SourceCfg(format="hf", path=str(qa_parquet(tmp_path))),
        "digits": SourceCfg(format="digits", limit=10),
    }
    usable = {"llava_json": {"good", "textonly"}, "hf": {str(i) for i in range(10)}}
    usable["digits"] = {f"digits-{i}" for i in range(10)}
    cfg = DataCfg(sources=[sources[name] for name in pair], eval_size=1)
    train, held_out, report = prepare(cfg, processor, BACKBONE, "processor", seed=0)
    kept = set(train["id"]) | set(held_out["id"])
    assert kept == usable[pair[0]] | usable[pair[1]] and len(held_out) == 2
    collate = TrainCollator(processor, BACKBONE)
    batch = collate([train[i] for i in range(len(train))])  # every image opens from the one feature
    assert batch["input_ids"].shape[0] == len(train) and "pixel_values" in batch
