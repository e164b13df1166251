"""A GGUF file's header read and checked before anything else reads it, as llama.cpp's reader does:
every count and length within the bytes the file holds (and under fixed limits), every value of
the type the GGUF specification gives it, every tensor's data inside the file.

The ``gguf`` package's reader (which transformers uses) trusts the file: an array whose count
exceeds the file loops for as long as the count says, a string key where a number belongs is a
``TypeError`` deep in transformers. This module reads only the header, with ``struct``, from a
file handle, keeping scalars and strings and only the type and length of arrays, so a hostile
header costs at most its own size to reject.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from m2pt_cli.errors import UserError, quote

VERSIONS = (2, 3)
MAX_KEYS = 1 << 16  # metadata pairs (a real model: a few dozen)
MAX_TENSORS = 1 << 16  # a 405B Llama: about 1,100
MAX_ARRAY_ITEMS = 1 << 21  # in all arrays together (a 256k vocabulary with types and scores: about 800k)
MAX_STRING = 4 << 20  # bytes in one string (a chat template: a few kilobytes)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_INTEGER = 1 << 31  # a width, a layer or head count, a token id
DEFAULT_ALIGNMENT = 32

# value type -> struct format (GGUF specification, little-endian)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
INTEGERS, FLOATS, BOOL = {0, 1, 2, 3, 4, 5, 10, 11}, {6, 12}, 7
TYPE_NAMES = {
    **dict(zip(SCALARS, ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool"), strict=False)),
    10: "uint64",
    11: "int64",
    12: "float64",
    STRING: "string",
    ARRAY: "array",
}

# What the specification says the keys transformers reads hold ("{arch}." keys by their suffix).
INTEGER_KEYS = {
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.dimension_count",
    "vocab_size",
    "expert_count",
    "expert_used_count",
    "expert_feed_forward_length",
}
PER_LAYER_KEYS = {"feed_forward_length", "attention.head_count", "attention.head_count_kv"}  # may be arrays
FLOAT_KEYS = {
    "attention.layer_norm_rms_epsilon",
    "attention.layer_norm_epsilon",
    "rope.freq_base",
    "rope.scaling.factor",
}
TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "string",
    "tokenizer.ggml.pre": "string",
    "tokenizer.chat_template": "string",
    "tokenizer.ggml.tokens": "array of string",
    "tokenizer.ggml.merges": "array of string",
    "tokenizer.ggml.token_type": "array of integer",
    "tokenizer.ggml.scores": "array of float",
    "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.ggml.add_space_prefix": "bool",
}
TOKEN_ID_SUFFIX = "_token_id"
CHAT_TEMPLATE = "tokenizer.chat_template"


@dataclass(frozen=True)
class Array:
    """An array value: its element type and length (the elements are not kept)."""

    item_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it: GGUF dims (fastest first), GGML type, bytes, offset."""

    dims: tuple[int, ...]
    ggml_type: int
    nbytes: int
    offset: int


@dataclass
class Header:
    """The checked header: metadata (arrays as :class:`Array`), tensors by name, where data starts."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_offset: int = 0

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


class _Reader:
    """Reads a GGUF header from ``handle``, every read checked against the bytes left."""

    def __init__(self, handle: BinaryIO, size: int, where: str) -> None:
        self.handle, self.size, self.where, self.items = handle, size, where, 0

    @property
    def left(self) -> int:
        return self.size - self.handle.tell()

    def fail(self, what: str) -> UserError:
        return UserError(f"model.name_or_path: {self.where} is not a valid GGUF file: {what}")

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.fail(f"{what} needs {n} bytes at offset {self.handle.tell()}, the file has {self.left} left")
        return self.handle.read(n)

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, limit: int, unit: int) -> int:
        """A uint64 count, at most ``limit`` and at most what ``unit`` bytes each leaves room for."""
        n = self.scalar("Q", what)
        room = self.left // max(unit, 1)
        if n > limit or n > room:
            raise self.fail(f"{what} is {n}; at most {min(limit, room)} fit (limit {limit}, {self.left} bytes left)")
        return n

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        raw = self.take(self.count(f"the length of {what}", limit, 1), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, kind: int, what: str) -> Any:
        if kind in SCALARS:
            return self.scalar(SCALARS[kind], what)
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY:
            raise self.fail(f"{what} has value type {kind}, which GGUF does not define (0-12)")
        item = self.scalar("I", f"the item type of {what}")
        if item == ARRAY:
            raise self.fail(f"{what} is an array of arrays (not supported, as in llama.cpp)")
        if item not in SCALARS and item != STRING:
            raise self.fail(f"{what} has item type {item}, which GGUF does not define")
        unit = 8 if item == STRING else struct.calcsize(SCALARS[item])
        length = self.count(f"the length of {what}", MAX_ARRAY_ITEMS - self.items, unit)
        self.items += length
        if item == STRING:
            for _ in range(length):
                self.take(self.count(f"a string in {what}", MAX_STRING, 1), what)
        else:
            self.take(length * unit, what)
        return Array(item, length)


def read_header(path: Path, where: str | None = None) -> Header:
    """The header of the GGUF file at ``path``, checked (structure, types, tensors within the file).

    Raises:
        UserError: one line naming the first thing that is wrong.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        reader = _Reader(handle, size, where or str(path))
        if reader.take(4, "the magic") != b"GGUF":
            raise reader.fail("it does not start with GGUF")
        version = reader.scalar("I", "the version")
        if version not in VERSIONS:
            raise reader.fail(
                f"version {version} (this reader takes {' and '.join(map(str, VERSIONS))}, little-endian)"
            )
        header = Header(version)
        n_tensors = reader.count("the tensor count", MAX_TENSORS, 8 + 4 + 4 + 8)
        n_keys = reader.count("the key count", MAX_KEYS, 8 + 4)
        for _ in range(n_keys):
            key = reader.string("a metadata key", 1 << 16)
            if key in header.metadata:
                raise reader.fail(f"the key {quote(key)} appears twice")
            kind = reader.scalar("I", f"the type of {quote(key)}")
            header.metadata[key] = (kind, reader.value(kind, quote(key)))
        alignment = _alignment(header, reader)
        for _ in range(n_tensors):
            name = reader.string("a tensor name", 1 << 16)
            if name in header.tensors:
                raise reader.fail(f"the tensor {quote(name)} appears twice")
            header.tensors[name] = _tensor_info(reader, name, alignment)
        header.data_offset = -(-handle.tell() // alignment) * alignment
    _check_data(header, reader, size)
    header.metadata = {key: value for key, (kind, value) in header.metadata.items()}
    _check_types(header, reader)
    return header


def _alignment(header: Header, reader: _Reader) -> int:
    kind, value = header.metadata.get("general.alignment", (4, DEFAULT_ALIGNMENT))
    if kind != 4 or value <= 0 or value & (value - 1):
        raise reader.fail(f"general.alignment must be a uint32 power of two, got {quote(value)}")
    return value


def _tensor_info(reader: _Reader, name: str, alignment: int) -> TensorInfo:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    what = f"the tensor {quote(name)}"
    n_dims = reader.scalar("I", f"the dimension count of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise reader.fail(f"{what} has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = tuple(reader.scalar("Q", f"the dimensions of {what}") for _ in range(n_dims))
    kind = reader.scalar("I", f"the type of {what}")
    offset = reader.scalar("Q", f"the offset of {what}")
    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    if kind not in sizes:
        known = ", ".join(t.name for t in GGMLQuantizationType if int(t) in sizes)
        raise reader.fail(f"{what} has GGML type {kind}, not one of {known}")
    block, type_size = sizes[kind]
    if min(dims) < 1 or math.prod(dims) >= 1 << 62 or dims[0] % block:
        raise reader.fail(f"{what} has dimensions {list(dims)}, which its type ({block}-wide blocks) cannot hold")
    if offset % alignment:
        raise reader.fail(f"{what} starts at offset {offset}, not a multiple of the alignment {alignment}")
    return TensorInfo(dims, kind, math.prod(dims) // block * type_size, offset)


def _check_data(header: Header, reader: _Reader, size: int) -> None:
    """Every tensor's bytes inside the file, none overlapping another's."""
    end = 0
    for name, info in sorted(header.tensors.items(), key=lambda item: item[1].offset):
        start = header.data_offset + info.offset
        if info.offset < end:
            raise reader.fail(f"the tensor {quote(name)} overlaps the one before it")
        end = info.offset + info.nbytes
        if start + info.nbytes > size:
            raise reader.fail(
                f"the tensor {quote(name)} needs bytes {start}..{start + info.nbytes}, the file ends at {size} "
                "(truncated?)"
            )


def _kind_of(value: Any, kind: int) -> str:
    if kind == ARRAY:
        item = "string" if value.item_type == STRING else _kind_of(None, value.item_type)
        return f"array of {item}"
    if kind in INTEGERS:
        return "integer"
    if kind in FLOATS:
        return "float"
    return "bool" if kind == BOOL else "string"


def _check_types(header: Header, reader: _Reader) -> None:
    """The keys transformers reads hold what the specification says (a number where a number belongs)."""
    kinds = {key: _kind_of(value, _type_code(value)) for key, value in header.metadata.items()}
    if kinds.get("general.architecture") != "string":
        raise reader.fail("general.architecture must be a string")
    arch = header.architecture
    wanted: dict[str, set[str]] = {}
    for key in kinds:
        suffix = key.removeprefix(f"{arch}.") if key.startswith(f"{arch}.") else None
        if suffix in INTEGER_KEYS:
            wanted[key] = {"integer"} | ({"array of integer"} if suffix in PER_LAYER_KEYS else set())
        elif suffix in FLOAT_KEYS:
            wanted[key] = {"float", "integer"}
        elif key in TOKENIZER_KEYS:
            wanted[key] = {TOKENIZER_KEYS[key]}
            if TOKENIZER_KEYS[key] == "array of float":
                wanted[key].add("array of integer")
        elif key.startswith("tokenizer.ggml.") and key.endswith(TOKEN_ID_SUFFIX):
            wanted[key] = {"integer"}
    for key, allowed in wanted.items():
        if kinds[key] not in allowed:
            raise reader.fail(
                f"{quote(key)} is {_a(kinds[key])}, the GGUF specification says {' or '.join(sorted(allowed))}"
            )
        value = header.metadata[key]
        if kinds[key] == "integer" and not 0 <= value < MAX_INTEGER:
            raise reader.fail(f"{quote(key)} is {value}, outside 0..{MAX_INTEGER - 1}")
    layers = header.metadata.get(f"{arch}.block_count")
    if isinstance(layers, int) and layers > len(header.tensors):
        raise reader.fail(
            f"{quote(f'{arch}.block_count')} declares {layers} layers, but the file holds {len(header.tensors)} "
            "tensors (a model's weights must be in the file)"
        )


def _type_code(value: Any) -> int:
    if isinstance(value, Array):
        return ARRAY
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 6
    return STRING


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
