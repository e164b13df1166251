"""Bench data (``m2pt eval --data``) as rows: JSON files streamed one row at a time, and every image a
row names held to the image rule (``images.in_folder``) before anything opens it.

A local ``.json``/``.jsonl`` file is read here rather than by ``datasets`` (which converts the whole
file before the first row can be looked at): JSON lines (one object per line, each at most
``reading.MAX_LINE_BYTES``) or one JSON array of objects, read item by item. A bad row stops the
command when it is read; memory does not grow with the file's size, only with the rows it holds.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from m2pt_cli.data.images import LEAVES_FOLDER, in_folder, is_remote
from m2pt_cli.errors import UserError, quote
from m2pt_cli.reading import array_items, first_char, loads, numbered_lines

JSON_SUFFIXES = (".json", ".jsonl")
IMAGE_COLUMNS = ("image", "img")  # columns whose text is an image path
EXPECTED = "expected JSON lines (one object per line) or a JSON array of objects, each a row with the bench's columns"


class Rows:
    """Rows of a bench's data; ``features`` as ``datasets`` describes the columns (empty for JSON).

    Iterating yields each row with its image references checked: a path outside ``folders`` becomes
    ``{"bytes": None, "path": ..., "refused": reason}``, which the image policy refuses when the
    sample's image is opened (``record <id>: image path leaves the image folder ('<path>')``).
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]], features: Mapping, folders: tuple[Path, ...], absolute: bool):
        self.rows, self.features, self.folders, self.absolute = rows, features, folders, absolute

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.rows:
            yield {key: self._image(key, value) for key, value in row.items()}

    def _image(self, key: str, value: Any) -> Any:
        if isinstance(value, str) and key in IMAGE_COLUMNS:
            value = {"bytes": None, "path": value}
        elif not (isinstance(value, dict) and "path" in value and set(value) <= {"bytes", "path"}):
            return value
        path = value.get("path")
        if value.get("bytes") or not isinstance(path, str) or not path or is_remote(path):
            return value  # embedded bytes win (the path is only a name); a URL is refused when opened
        found = in_folder(path, self.folders, self.absolute)
        if found is None:
            return {"bytes": None, "path": path, "refused": LEAVES_FOLDER}
        return {"bytes": None, "path": found}


def json_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSON lines file or of a JSON array file, one at a time; the first row that is
    not a JSON object is a one-line error naming the file, the line (or item) and what is expected."""
    start = first_char(path)
    if start == "[":
        for index, item in array_items(path):
            if not isinstance(item, dict):
                raise UserError(f"--data: {path}: item {index} is {_kind(item)} ({quote(item)}); {EXPECTED}")
            yield item
        return
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            row = loads(line, f"--data: {path}: line {number}")
        except UserError as exc:
            raise UserError(f"{exc}; {EXPECTED}") from None
        if not isinstance(row, dict):
            raise UserError(f"--data: {path}: line {number} is {_kind(row)} ({quote(row)}); {EXPECTED}")
        yield row


def _kind(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _nonempty(rows: Iterator[dict[str, Any]], path: Path) -> Iterator[dict[str, Any]]:
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise UserError(f"--data: {path} holds no rows; {EXPECTED}")


def local_folder(data: str) -> Path | None:
    """The folder a local data file, folder or glob keeps its images in (a relative image path is
    looked up there), or None for a hub id."""
    from m2pt_cli.data.sources import DATA_SUFFIXES

    local = Path(data)
    if local.is_dir():
        return local
    if glob.has_magic(data):
        parts = local.parts
        plain = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
        return Path(*plain) if plain else Path(".")
    return local.parent if local.suffix in DATA_SUFFIXES else None


def bench_rows(data: str, split: str, revision: str | None = None) -> Rows:
    """A bench's rows from a hub id, a data file, a glob or a folder of data files (``load_table``);
    a single local JSON file is streamed (``json_rows``)."""
    from m2pt_cli.data.sources import load_table

    local = Path(data)
    folder = local_folder(data)
    if local.is_file() and local.suffix in JSON_SUFFIXES:
        return Rows(_nonempty(json_rows(local), local), {}, (local.parent,), absolute=False)
    table = load_table(data, split, revision)
    if folder is not None:
        return Rows(table, table.features, (folder,), absolute=False)
    return Rows(table, table.features, _library_caches(), absolute=True)


def _library_caches() -> tuple[Path, ...]:
    """Where ``datasets`` and the hub client keep what they download: the only places an image path
    of a hub data set may point to."""
    import datasets
    from huggingface_hub import constants

    return tuple(Path(os.path.expanduser(p)) for p in (datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE))
