"""Data sources, each read into a ``datasets.Dataset`` with columns ``id``, ``image``, ``conversations``.

``image`` is a ``datasets.Image(decode=False)`` feature (``{"bytes", "path"}``, never decoded here:
``m2pt_cli.data.images`` alone opens images, and never fetches a path that is a URL) or None;
``conversations`` is a list of LLaVA turns ``{"from": "human"|"gpt", "value": str}``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
from pathlib import Path
from typing import Any

from m2pt_cli.config import DATA_FORMATS, DIGIT_QUESTIONS
from m2pt_cli.data.images import LEAVES_FOLDER, REMOTE, in_folder, is_remote
from m2pt_cli.errors import UserError, first_line
from m2pt_cli.reading import array_items, first_char

_BATCH = 10_000  # records per Arrow batch when a JSON file is written to the scratch folder
DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


def _features():
    import datasets

    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    return datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(decode=False), "conversations": datasets.List(turn)}
    )


def read_source(cfg, key: str, scratch: Path | None = None):
    """Read one source (a ``SourceCfg``). ``key`` names it in errors (``data.sources[0]``).

    ``scratch``: a folder where a source read from a JSON file is written as Arrow, a batch at a
    time (memory does not grow with the file); without it the rows are kept in memory.
    """
    reader = {"llava_json": _llava_json, "hf": _hf, "digits": _digits}.get(cfg.format)
    if reader is None:
        raise UserError(f"{key}.format: {cfg.format!r} is not a data format (allowed: {', '.join(DATA_FORMATS)})")
    dataset = reader(cfg, key, scratch)
    if cfg.limit >= 0:
        dataset = dataset.select(range(min(cfg.limit, len(dataset))))
    return dataset


def _llava_row(index: int, record: Any, folder: Path) -> dict[str, Any]:
    """One record of a LLaVA JSON file as a row, with ``problem`` saying what is wrong with it."""
    problem = ""
    rid = str(record.get("id", index)) if isinstance(record, dict) else str(index)
    image = None
    turns: Any = []
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        problem = "no 'conversations' list"
    else:
        turns = record["conversations"]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            problem, turns = "a turn without a text 'value'", []
        else:
            turns = [{"from": str(t.get("from", "")), "value": t["value"]} for t in turns]
        name = record.get("image")
        if problem or not name:
            pass
        elif not isinstance(name, str):
            problem = "'image' is not a path"
        elif is_remote(name):
            problem, image = REMOTE, name  # the path as written, for the error line
        else:
            image = in_folder(name, (folder,))
            if image is None:
                problem, image = LEAVES_FOLDER, name
    return {
        "id": rid,
        "image": None if image is None else {"bytes": None, "path": image},
        "conversations": turns,
        "problem": problem,
    }


def _llava_json(cfg, key: str, scratch: Path | None = None):
    import datasets
    from datasets.arrow_writer import ArrowWriter

    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"{key}.path: data file {cfg.path!r} does not exist")
    first = first_char(path)
    if not first:
        raise UserError(f"{cfg.path}: not valid JSON (the file is empty); expected a JSON list of records")
    if first != "[":
        raise UserError(f"{cfg.path}: expected a JSON list of records (the file starts with {first!r})")
    folder = Path(cfg.image_folder) if cfg.image_folder else path.parent
    features = _features()
    features["problem"] = datasets.Value("string")
    limit = cfg.limit if cfg.limit >= 0 else None
    rows = (_llava_row(i - 1, record, folder) for i, record in array_items(path))  # one item parsed at a time
    if scratch is None:
        return datasets.Dataset.from_list(list(itertools.islice(rows, limit)), features=features)
    arrow = scratch / "records.arrow"
    with ArrowWriter(features=features, path=str(arrow)) as writer:
        kept = itertools.islice(rows, limit)
        while batch := list(itertools.islice(kept, _BATCH)):
            writer.write_batch({name: [row[name] for row in batch] for name in features})
        writer.finalize()
    return datasets.Dataset.from_file(str(arrow))


def load_table(path: str, split: str, revision: str | None = None):
    """A ``datasets.Dataset`` from a hub id, a data file, a glob, or a folder of data files.

    Nothing in it decodes on access: images arrive as ``{"bytes", "path"}`` (datasets' decoder
    would fetch an http(s) path a row names, even with HF_DATASETS_OFFLINE=1), and so do audio,
    video and the like, which m2pt never decodes.
    """
    import datasets

    local = Path(path)
    if local.is_dir() or local.suffix in DATA_SUFFIXES or "*" in path:
        files: Any = sorted(str(p) for p in local.iterdir() if p.suffix in DATA_SUFFIXES) if local.is_dir() else path
        first = files[0] if isinstance(files, list) and files else str(files)
        kind = DATA_SUFFIXES.get(os.path.splitext(first)[1], "parquet")
        return undecoded(datasets.load_dataset(kind, data_files=files, split="train"))
    return undecoded(datasets.load_dataset(path, split=split, revision=revision))


def _undecoded_feature(feature: Any) -> Any:
    if isinstance(feature, dict):
        return {key: _undecoded_feature(value) for key, value in feature.items()}
    if isinstance(feature, list):
        return [_undecoded_feature(value) for value in feature]
    if dataclasses.is_dataclass(feature):
        inner = getattr(feature, "feature", None)
        if inner is not None:  # Sequence / List / LargeList
            return dataclasses.replace(feature, feature=_undecoded_feature(inner))
        if getattr(feature, "decode", False) is True:  # Image, Audio, Video, Pdf, ...
            return dataclasses.replace(feature, decode=False)
    return feature


def undecoded(dataset):
    """``dataset`` with every decoding feature (at any depth) switched to ``decode=False``."""
    import datasets

    for column, feature in dataset.features.items():
        new = _undecoded_feature(feature)
        if new != feature:
            if dataclasses.is_dataclass(feature) and hasattr(feature, "decode"):
                dataset = dataset.cast_column(column, new)  # top level: a metadata change only
            else:
                dataset = dataset.cast(datasets.Features({**dataset.features, column: new}))
    return dataset


def _hf(cfg, key: str, scratch: Path | None = None):
    import datasets

    try:
        dataset = load_table(cfg.path, cfg.split, cfg.revision)
    except (FileNotFoundError, ValueError, OSError, IndexError, RuntimeError) as exc:  # RuntimeError: a loading script
        raise UserError(f"{key}.path: cannot load {cfg.path!r} ({first_line(exc)})") from None
    columns = dataset.column_names
    needed = [cfg.image_column] + (
        [cfg.conversation_column] if cfg.conversation_column else [cfg.question_column, cfg.answer_column]
    )
    for column in needed:
        if column and column not in columns:
            raise UserError(f"{key}: column {column!r} is not in {cfg.path} (columns: {', '.join(columns)})")

    def convert(row, index):
        if cfg.conversation_column:
            turns = [
                {"from": str(t.get("from", "")), "value": str(t.get("value", ""))} for t in row[cfg.conversation_column]
            ]
        else:
            turns = [
                {"from": "human", "value": f"<image>\n{row[cfg.question_column]}"},
                {"from": "gpt", "value": str(row[cfg.answer_column])},
            ]
        rid = str(row[cfg.id_column]) if cfg.id_column in row else str(index)
        return {"id": rid, "image": row[cfg.image_column] if cfg.image_column else None, "conversations": turns}

    if cfg.image_column and not isinstance(dataset.features[cfg.image_column], datasets.Image):
        dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
    out = dataset.map(convert, with_indices=True, remove_columns=columns, features=_features())
    return out


def _digits(cfg, key: str, scratch: Path | None = None):
    """scikit-learn's 1,797 handwritten digits (8 x 8) as 32 x 32 instruction samples, asked with the
    chosen wordings (``cfg.questions``) in turn; the images and their order never change, so a
    held-out split is the same images whatever the wording."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    wordings = [DIGIT_QUESTIONS[q] for q in cfg.questions] or list(DIGIT_QUESTIONS)
    rows: dict[str, list] = {"id": [], "image": [], "conversations": []}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        gray = (255 - pixels * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        image = Image.fromarray(gray).convert("RGB").resize((32, 32), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows["id"].append(f"digits-{i}")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["conversations"].append(
            [
                {"from": "human", "value": f"<image>\n{wordings[i % len(wordings)]}"},
                {"from": "gpt", "value": str(int(label))},
            ]
        )
    return datasets.Dataset.from_dict(rows, features=_features())
