"""Reading files that strangers made within bounds: a size checked before a byte is parsed, a nesting
depth checked before a value is used, lines read one at a time, each with a length bound.

A small file must not cost gigabytes or minutes, nor end in an internal error (a 100,000-deep JSON
document is a ``RecursionError`` inside the parser): every refusal here is one ``UserError`` line
naming the file and the bound.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m2pt_cli.errors import UserError, first_line

MiB = 1 << 20
MAX_JSON_BYTES = 64 * MiB  # a record m2pt writes (results.json, summary.json, trainer_state.json)
MAX_DEPTH = 64  # m2pt's own files nest at most 5 deep
MAX_LINE_BYTES = 16 * MiB  # one JSON line (a predictions row, a data row); one array item
_CHUNK = MiB


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def read_bytes(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path``, refused before reading when there are more than ``max_bytes``
    (checked on the size and again while reading: a device or a growing file has no honest size)."""
    path = Path(path)
    if _size(path) > max_bytes:
        raise UserError(f"{path}: {_size(path):,} bytes; a {what} is at most {max_bytes:,} bytes")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise UserError(f"{path}: more than {max_bytes:,} bytes; a {what} is at most {max_bytes:,} bytes")
    return data


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> int | None:
    """The first depth beyond ``max_depth`` that ``value`` reaches, or None. Iterative, and each
    container is visited once at its deepest place found first (YAML aliases share one object, so
    a billion-laughs document is walked in its own size, not its expanded one)."""
    seen: dict[int, int] = {}
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            return depth
        if seen.get(id(item), 0) >= depth:
            continue
        seen[id(item)] = depth
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return None


def loads(text: str | bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with a nesting bound: a malformed or too deep document is one ``UserError``
    line naming ``where`` (a file, or a file and line)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    if check_depth(value, max_depth) is not None:
        raise UserError(f"{where}: JSON nested deeper than {max_depth} levels")
    return value


def read_json(path: Path, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file, its size bounded before it is read and its nesting bounded (``loads``)."""
    return loads(read_bytes(Path(path), max_bytes, what), str(path), max_depth)


def numbered_lines(path: Path, max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line end) of each line of ``path``, read one at a time: the
    memory held is one line, and a line longer than ``max_line`` bytes is refused once that many
    are read, never held whole."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, in the generator's finally
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        number = 0
        while True:
            line = handle.readline(max_line + 1)
            if not line:
                return
            number += 1
            if len(line) > max_line and not (len(line) == max_line + 1 and line.endswith(b"\n")):
                raise UserError(f"{path}: line {number} is longer than {max_line:,} bytes; a row is at most that")
            yield number, line.rstrip(b"\r\n")


def array_items(path: Path, max_item: int = MAX_LINE_BYTES, max_depth: int = MAX_DEPTH) -> Iterator[tuple[int, Any]]:
    """(1-based index, value) of each item of the JSON array that ``path`` holds, parsed one item at
    a time from a bounded window (an item longer than ``max_item`` characters is refused), so memory
    does not grow with the file. Anything else than one array is a one-line error."""
    path = Path(path)
    decoder = json.JSONDecoder()
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        buf, pos, eof = "", 0, False

        def fill() -> None:
            nonlocal buf, pos, eof
            try:
                chunk = handle.read(_CHUNK)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return buf[pos] if pos < len(buf) else ""
                fill()

        fill()
        if skip_space() != "[":
            raise UserError(f"{path}: not a JSON array")
        pos += 1
        index = 0
        while True:
            char = skip_space()
            if char == "]" and index == 0:
                pos += 1
                break
            index += 1
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except RecursionError:
                    raise UserError(f"{path}: item {index} is JSON nested deeper than {max_depth} levels") from None
                except json.JSONDecodeError as exc:
                    if eof or len(buf) - pos > max_item:
                        reason = f"longer than {max_item:,} characters" if not eof else f"not JSON ({exc.msg})"
                        raise UserError(f"{path}: item {index} of the array is {reason}") from None
                    fill()
                    continue
                if end == len(buf) and not eof:  # a number may go on in the next chunk
                    fill()
                    continue
                break
            if end - pos > max_item:
                raise UserError(f"{path}: item {index} of the array is longer than {max_item:,} characters")
            if check_depth(value, max_depth) is not None:
                raise UserError(f"{path}: item {index} is JSON nested deeper than {max_depth} levels")
            pos = end
            yield index, value
            char = skip_space()
            if char == ",":
                pos += 1
                continue
            if char == "]":
                pos += 1
                break
            raise UserError(f"{path}: after item {index} of the array: expected ',' or ']'")
        if skip_space():
            raise UserError(f"{path}: text after the JSON array")


def first_char(path: Path) -> str:
    """The first character of ``path`` that is not white space ('' for an empty file), read in
    bounded chunks."""
    try:
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(_CHUNK)
                if not chunk:
                    return ""
                stripped = chunk.lstrip(b" \t\r\n")
                if stripped:
                    return chr(stripped[0])
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({first_line(exc)})") from None
