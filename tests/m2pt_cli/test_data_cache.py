"""The encoded-data cache: a second start reads what the first encoded; a changed input gets a new
entry; a damaged entry is rebuilt with one log line; an entry is whole or absent; several encoding
processes give the rows one process gives; bad records are still refused from the cache."""

from __future__ import annotations

import io
import json
import logging
import os

import datasets
import pytest
from PIL import Image
from transformers import AutoProcessor

from m2pt_cli.backbones.llava import LlavaBackbone
from m2pt_cli.config import DataCfg, SourceCfg
from m2pt_cli.data import cache
from m2pt_cli.data.build import prepare, split_off
from m2pt_cli.errors import UserError

BACKBONE = LlavaBackbone()


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("M2PT_CACHE", str(folder))
    return folder / "data"


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_source(folder, n: int, bad: tuple[int, ...] = (), answer: str = "A dot") -> SourceCfg:
    """``n`` LLaVA records over a pool of 4 images (records in ``bad`` name a missing one); every
    seventh record is text-only."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (images / f"{i}.png").write_bytes(png((60 * i, 20, 200 - 40 * i)))
    records = []
    for i in range(n):
        question = "What is it?" + " Look closely." * (i % 5)
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": question}]}
        record["conversations"].append({"from": "gpt", "value": f"{answer} {i}."})
        if i % 7:
            record["image"] = "missing.png" if i in bad else f"{i % 4}.png"
            record["conversations"][0]["value"] = "<image>\n" + question
        records.append(record)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return SourceCfg(format="llava_json", path=str(path), image_folder=str(images))


def rows(dataset) -> list[tuple]:
    return [(r["id"], r["input_ids"], r["labels"], (r["image"] or {}).get("path")) for r in dataset]


def entries(cache_dir) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.is_dir() else []


def test_a_second_start_reads_the_cache_and_gets_the_same_rows(processor, tmp_path, cache_dir, caplog):
    cfg = DataCfg(sources=[write_source(tmp_path, 40)], eval_size=5)
    with caplog.at_level(logging.INFO, logger="m2pt"):
        first_train, first_held, first = prepare(cfg, processor, BACKBONE, "processor", seed=3)
    assert any("records encoded in" in r.message for r in caplog.records)
    assert first.cache == [f"data.sources[0]: built {cache_dir / entries(cache_dir)[0]}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="m2pt"):
        train, held, again = prepare(cfg, processor, BACKBONE, "processor", seed=3)
    assert not any("encoded in" in r.message for r in caplog.records)  # nothing encoded the second time
    assert again.cache[0].startswith("data.sources[0]: reused ")
    assert rows(train) == rows(first_train) and rows(held) == rows(first_held)
    # images stay files the collator opens: neither their bytes in the cache nor their paths cut short
    images = [r["image"] for r in train if r["image"] is not None]
    assert images and all(i["bytes"] is None and os.path.isfile(i["path"]) for i in images)
    assert (again.records, again.kept, again.train, again.held_out) == (40, 40, 35, 5)
    assert again.tokens == first.tokens and again.tokens["min"] <= again.tokens["median"] <= again.tokens["max"]
    assert len(entries(cache_dir)) == 1


def test_what_the_encoding_depends_on_gets_a_new_entry(processor, tmp_path, cache_dir):
    source = write_source(tmp_path, 12)
    base = prepare(DataCfg(sources=[source]), processor, BACKBONE, "processor", seed=0)[0]
    shorter = prepare(DataCfg(sources=[source], max_length=30), processor, BACKBONE, "processor", seed=0)[0]
    assert max(len(ids) for ids in shorter["input_ids"]) <= 30 < max(len(ids) for ids in base["input_ids"])
    assert len(entries(cache_dir)) == 2
    write_source(tmp_path, 12, answer="A square")  # the same file name, new content
    os.utime(source.path, ns=(os.stat(source.path).st_atime_ns, os.stat(source.path).st_mtime_ns + 10**9))
    changed = prepare(DataCfg(sources=[source]), processor, BACKBONE, "processor", seed=0)[0]
    decoded = processor.tokenizer.decode([t for t in changed[0]["labels"] if t != -100])
    assert "square" in decoded and len(entries(cache_dir)) == 3
    other_template = prepare(DataCfg(sources=[source]), processor, BACKBONE, "vicuna_v1", seed=0)[0]
    assert len(entries(cache_dir)) == 4 and len(other_template) == 12


@pytest.mark.parametrize("damage", ["truncated arrow", "no record", "garbage record", "wrong size"])
def test_a_damaged_entry_is_rebuilt_with_one_log_line(processor, tmp_path, cache_dir, caplog, damage):
    cfg = DataCfg(sources=[write_source(tmp_path, 20)])
    expected = rows(prepare(cfg, processor, BACKBONE, "processor", seed=0)[0])
    entry = cache_dir / entries(cache_dir)[0]
    arrow = next((entry / cache.DATASET).glob("*.arrow"))
    if damage == "truncated arrow":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "no record":
        (entry / cache.META).unlink()
    elif damage == "garbage record":
        (entry / cache.META).write_text("{not json")
    else:
        with open(arrow, "ab") as handle:
            handle.write(b"\0" * 8)
    with caplog.at_level(logging.INFO, logger="m2pt"):
        train = prepare(cfg, processor, BACKBONE, "processor", seed=0)[0]
    damaged = [r.message for r in caplog.records if "is damaged" in r.message]
    assert len(damaged) == 1 and str(entry) in damaged[0] and "building it again" in damaged[0]
    assert rows(train) == expected and entries(cache_dir) == [entry.name]


def test_an_entry_is_whole_or_absent(processor, tmp_path, cache_dir, monkeypatch):
    cfg = DataCfg(sources=[write_source(tmp_path, 10)])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", full_disk)  # moving the encoded rows into the entry
    with pytest.raises(OSError):
        prepare(cfg, processor, BACKBONE, "processor", seed=0)
    assert [name for name in entries(cache_dir) if ".partial-" not in name] == []  # no entry a reader would take
    monkeypatch.undo()
    monkeypatch.setenv("M2PT_CACHE", str(cache_dir.parent))
    leftover = [name for name in entries(cache_dir) if ".partial-" in name]
    dead = cache_dir / (leftover[0].rsplit("-", 1)[0] + "-999999999")  # a partial folder of a process long gone
    (cache_dir / leftover[0]).rename(dead)
    prepare(cfg, processor, BACKBONE, "processor", seed=0)
    assert len(entries(cache_dir)) == 1 and ".partial-" not in entries(cache_dir)[0]


def test_bad_records_are_refused_from_the_cache_with_their_source_and_id(processor, tmp_path, cache_dir, caplog):
    source = write_source(tmp_path, 20, bad=(3, 9))
    train, _, report = prepare(DataCfg(sources=[source]), processor, BACKBONE, "processor", seed=0)
    assert len(train) == 18 and report.kept == 18
    assert report.skipped_ids == ["r3", "r9"] and sum(report.skipped.values()) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="m2pt"), pytest.raises(UserError) as refused:
        prepare(DataCfg(sources=[source], on_bad_record="error"), processor, BACKBONE, "processor", seed=0)
    assert any("from the cache" in r.message for r in caplog.records)  # the refusal came from the cache path
    assert str(refused.value).startswith("data.sources[0]: record r3: ") and "missing.png" in str(refused.value)


def test_several_encoding_processes_give_the_rows_of_one(processor, tmp_path, cache_dir, caplog):
    source = write_source(tmp_path, 1200, bad=(8, 600))
    with caplog.at_level(logging.INFO, logger="m2pt"):
        one = prepare(DataCfg(sources=[source], num_proc=1), processor, BACKBONE, "processor", seed=0)
        cache_one = sorted(cache_dir.iterdir())[0]
        cache_one.rename(tmp_path / "set-aside")  # the same key: make the second build again
        two = prepare(DataCfg(sources=[source], num_proc=2), processor, BACKBONE, "processor", seed=0)
    built = [r.message for r in caplog.records if "encoded in" in r.message]
    assert "with 1 process;" in built[0] and "with 2 processes;" in built[1]
    assert rows(one[0]) == rows(two[0]) and one[2].skipped == two[2].skipped and one[2].kept == 1198


def test_split_off_is_datasets_train_test_split():
    table = datasets.Dataset.from_dict({"x": list(range(50))})
    reference = table.train_test_split(test_size=7, seed=11)
    train, held = split_off(table, 7, 11)
    assert train["x"] == reference["train"]["x"] and held["x"] == reference["test"]["x"]
