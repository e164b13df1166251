"""A GGUF LLM named in a recipe: a missing file, a file that is not GGUF, a package that is not
installed, or a hostile file (#36) is one line (exit 2) naming ``model.name_or_path``, with nothing
written and nothing converted.

Hostile files are built with the ``gguf`` package's ``GGUFWriter`` (tests/gguf_factory.py) or, for
headers no writer produces, byte by byte."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.cli.measured import run_measured
from tests.gguf_factory import llama_tensors, write_gguf
from tests.helpers import m2pt, refused

pytestmark = pytest.mark.bad_input


# The refused command's own peak: about 0.5 GiB (a header refusal) to 0.8 GiB (after the meta-device
# model) alone, more under a test runner; the attacks took 3 GiB (no tensors) and 3.5 GiB (template).
PEAK_BOUND = 3 * 2**29


def recipe(tmp_path, name_or_path: str):
    model = {"backbone": "openclip_vicuna", "name_or_path": name_or_path, "vision_tower": "ViT-S-32"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return path


@pytest.fixture
def cache(tmp_path_factory, monkeypatch) -> Path:
    """An empty ``$M2PT_CACHE``: what a refused file would have converted lands here."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("M2PT_CACHE", str(folder))
    return folder


def nothing_in(folder: Path) -> bool:
    """No file anywhere below ``folder`` (a refused conversion leaves none, not even a temporary one)."""
    return not any(p.is_file() or p.is_symlink() for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("name_or_path", "needles"),
    [
        ("./missing.gguf", ("model.name_or_path", "missing.gguf", "is not a file")),
        ("./weights.gguf", ("model.name_or_path", "weights.gguf", "is not a GGUF file")),
        ("package:no_such_package_m2pt/x.gguf", ("model.name_or_path", "'no_such_package_m2pt' is not installed")),
        ("package:json", ("model.name_or_path", "must be package:NAME/FILE")),
    ],
)
def test_bad_gguf_names_are_refused(tmp_path, name_or_path, needles):
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    path = recipe(tmp_path, name_or_path)
    refused(["info", path], tmp_path, *needles)


def test_train_refuses_a_file_that_is_not_gguf_before_writing(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    path = recipe(tmp_path, "./weights.gguf")
    refused(["train", path, "--output-dir", tmp_path / "run"], tmp_path, "is not a GGUF file")


# -- headers: counts within the file, types as the specification says -----------------------------


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, kind: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", kind) + payload


ARCH = kv("general.architecture", 8, gguf_string("llama"))


def raw_gguf(kvs: list[bytes], tensors: list[bytes] = (), n_kv: int | None = None, n_tensors: int | None = None):
    """A GGUF v3 file's bytes: header, the given metadata pairs and tensor infos, counts as given."""
    n_kv = len(kvs) if n_kv is None else n_kv
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    n_dims = len(dims) if n_dims is None else n_dims
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", n_dims, *dims, ggml_type, offset)


RAW_HEADERS = {
    "tensor count past the file": (raw_gguf([ARCH], n_tensors=2**40), "the tensor count is 1099511627776"),
    "key count past the file": (raw_gguf([ARCH], n_kv=2**60), "the key count is"),
    "array count past the file": (
        raw_gguf([ARCH, kv("x.a", 9, struct.pack("<IQ", 0, 2**60))]),
        "the length of 'x.a' is 1152921504606846976",
    ),
    "array of strings past the file": (
        raw_gguf([ARCH, kv("x.a", 9, struct.pack("<IQ", 8, 2**33))]),
        "the length of 'x.a'",
    ),
    "string past the file": (raw_gguf([ARCH, kv("x.s", 8, struct.pack("<Q", 2**62))]), "the length of 'x.s'"),
    "key past the file": (raw_gguf([struct.pack("<Q", 2**50) + bytes(16)]), "the length of a metadata key"),
    "unknown value type": (raw_gguf([ARCH, kv("x.t", 99, b"")]), "value type 99"),
    "array of arrays": (raw_gguf([ARCH, kv("x.n", 9, struct.pack("<IQ", 9, 1))]), "an array of arrays"),
    "unknown item type": (raw_gguf([ARCH, kv("x.n", 9, struct.pack("<IQ", 42, 1))]), "item type 42"),
    "key that is not UTF-8": (raw_gguf([kv(b"\xff\xfe", 4, struct.pack("<I", 1))]), "is not UTF-8"),
    "key given twice": (raw_gguf([ARCH, ARCH]), "appears twice"),
    "alignment not a power of two": (
        raw_gguf([ARCH, kv("general.alignment", 4, struct.pack("<I", 3))]),
        "general.alignment must be a uint32 power of two",
    ),
    "too many dimensions": (raw_gguf([ARCH], [tensor_info("t", [1] * 3, n_dims=1000)]), "has 1000 dimensions"),
    "unknown tensor type": (raw_gguf([ARCH], [tensor_info("t", [4], ggml_type=99)]), "GGML type 99"),
    "tensor data past the file": (raw_gguf([ARCH], [tensor_info("t", [2**40])]), "the file ends at"),
    "zero dimension": (raw_gguf([ARCH], [tensor_info("t", [0])]), "has dimensions [0]"),
    "tensor given twice": (raw_gguf([ARCH], [tensor_info("t", [1]), tensor_info("t", [1])]), "appears twice"),
    "tensors overlapping": (
        raw_gguf([ARCH], [tensor_info("a", [64]), tensor_info("b", [64], offset=32)]) + bytes(512),
        "overlaps",
    ),
    "misaligned tensor": (raw_gguf([ARCH], [tensor_info("t", [1], offset=3)]) + bytes(64), "not a multiple of"),
    "version 1": (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "version 50331648"),
    "cut short": (b"GGUF" + struct.pack("<I", 3) + b"\x01", "the tensor count needs 8 bytes"),
    "architecture not a string": (raw_gguf([kv("general.architecture", 4, struct.pack("<I", 7))]), "must be a string"),
}


@pytest.mark.parametrize("case", sorted(RAW_HEADERS))
def test_a_hostile_header_is_refused_in_one_line(tmp_path, cache, case):
    content, needle = RAW_HEADERS[case]
    (tmp_path / "evil.gguf").write_bytes(content)
    refused(["info", recipe(tmp_path, "./evil.gguf")], tmp_path, "evil.gguf is not a valid GGUF file", needle)
    assert nothing_in(cache)


WRONG_TYPES = {
    "llama.block_count": ("two", "'llama.block_count' is a string, the GGUF specification says integer"),
    "llama.embedding_length": (-16, "'llama.embedding_length' is -16, outside 0.."),
    "llama.attention.layer_norm_rms_epsilon": ("tiny", "is a string, the GGUF specification says float or integer"),
    "tokenizer.ggml.tokens": ([1, 2, 3], "'tokenizer.ggml.tokens' is an array of integer"),
    "tokenizer.ggml.eos_token_id": ("eos", "'tokenizer.ggml.eos_token_id' is a string"),
    "tokenizer.chat_template": (7, "'tokenizer.chat_template' is an integer, the GGUF specification says string"),
    "tokenizer.ggml.add_bos_token": ("yes", "is a string, the GGUF specification says bool"),
}


@pytest.mark.parametrize("key", sorted(WRONG_TYPES))
def test_a_key_of_the_wrong_type_is_refused_in_one_line(tmp_path, cache, key):
    value, needle = WRONG_TYPES[key]
    write_gguf(tmp_path / "evil.gguf", extra={key: value})
    refused(["info", recipe(tmp_path, "./evil.gguf")], tmp_path, "evil.gguf", needle)
    assert nothing_in(cache)


# -- tensors: every weight the metadata implies is in the file, of its shape -----------------------


def test_a_4kb_file_claiming_a_4096_wide_model_is_refused_before_anything_is_allocated(tmp_path, cache):
    path = write_gguf(tmp_path / "claims.gguf", tensors={}, width=4096, layers=3)
    assert path.stat().st_size < 8192
    result = run_measured("info", recipe(tmp_path, "./claims.gguf"), env={"M2PT_CACHE": str(cache)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "'llama.block_count' declares 3 layers, but the file holds 0 tensors" in lines[0]
    assert nothing_in(cache)
    assert result.peak_bytes < PEAK_BOUND, f"peak {result.peak_bytes / 2**30:.2f} GiB"
    assert result.seconds < 60


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("a layer's tensor left out", "holds no tensor for model.layers.1.mlp.up_proj.weight"),
        ("every tensor of another width", "needs [4096, 4096] for model.layers.0.self_attn.q_proj.weight"),
        ("the embedding left out", "holds no tensor for model.embed_tokens.weight"),
    ],
)
def test_a_file_without_the_weights_its_metadata_implies_is_refused(tmp_path, cache, case, needle):
    tensors = llama_tensors()
    width = 16
    if case == "a layer's tensor left out":
        del tensors["blk.1.ffn_up.weight"]
    elif case == "the embedding left out":
        del tensors["token_embd.weight"]
    else:
        width = 4096
        tensors = {name: value for name, value in tensors.items() if name != "token_embd.weight"}
        tensors = {"token_embd.weight": llama_tensors(width=4096, layers=0)["token_embd.weight"], **tensors}
    write_gguf(tmp_path / "evil.gguf", tensors=tensors, width=width)
    refused(["info", recipe(tmp_path, "./evil.gguf")], tmp_path, "evil.gguf", needle)
    assert nothing_in(cache)


def test_a_tokenizer_transformers_cannot_build_is_one_line(tmp_path, cache):
    write_gguf(tmp_path / "evil.gguf", extra={"tokenizer.ggml.merges": ["q z"]})
    refused(["info", recipe(tmp_path, "./evil.gguf")], tmp_path, "cannot read the tokenizer of", "out of vocabulary")
    assert nothing_in(cache)


def test_a_whole_tiny_gguf_converts_once_with_its_manifest(tmp_path, cache):
    """Control: the checks accept a complete file; the converted folder is reused, not rebuilt."""
    write_gguf(tmp_path / "tiny.gguf")
    path = recipe(tmp_path, "./tiny.gguf")
    assert "parameters" in m2pt("info", path).stdout
    (entry,) = (cache / "gguf").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "m2pt_gguf.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    m2pt("info", path)
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp


# -- the conversion cache: used only when it is what m2pt wrote ------------------------------------

PICKLE_PROGRAM = "import pathlib; pathlib.Path({marker!r}).write_text('unpickled')"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import builtins

        return builtins.exec, (PICKLE_PROGRAM.format(marker=str(self.marker)),)


def entry_for(cache: Path, gguf: Path) -> Path:
    """Where the conversion of ``gguf`` lives in ``cache`` (``gguf_files.hf_folder``'s naming)."""
    from m2pt_cli.gguf_files import file_sha256

    return cache / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def plant_pickle(folder: Path, marker: Path, manifest: bool = False) -> None:
    import json
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    if manifest:  # a consistent manifest that lists the pickle
        from m2pt_cli.gguf_cache import _digest

        files = {p.name: {"size": p.stat().st_size, "sha256": _digest(p)} for p in folder.iterdir()}
        (folder / "m2pt_gguf.json").write_text(json.dumps({"source_sha256": "x", "files": files}))


@pytest.mark.parametrize("planted", ["pickle", "pickle with a manifest", "link to another folder", "torn weights"])
def test_a_planted_or_torn_cache_entry_is_rebuilt_never_read(tmp_path, cache, planted):
    import pickle

    marker = tmp_path / "outside" / "marker"
    marker.parent.mkdir()
    with pytest.raises(pickle.UnpicklingError):  # control: the payload is live where transformers would read it
        import torch

        plant_pickle(tmp_path / "probe", marker)
        torch.load(tmp_path / "probe" / "pytorch_model.bin", weights_only=True)
    gguf = write_gguf(tmp_path / "tiny.gguf")
    path = recipe(tmp_path, "./tiny.gguf")
    entry = entry_for(cache, gguf)
    if planted.startswith("pickle"):
        plant_pickle(entry, marker, manifest=planted.endswith("manifest"))
    elif planted == "link to another folder":
        elsewhere = tmp_path / "outside" / "folder"
        plant_pickle(elsewhere, marker)
        entry.parent.mkdir(parents=True)
        entry.symlink_to(elsewhere, target_is_directory=True)
    else:
        m2pt("info", path)
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    outside = sorted(p.name for p in marker.parent.rglob("*"))
    result = m2pt("info", path)
    assert "parameters" in result.stdout
    assert "converting the GGUF file again" in result.stderr
    assert not marker.exists()
    assert sorted(p.name for p in marker.parent.rglob("*")) == outside  # nothing written through the link
    assert not entry.is_symlink() and not (entry / "pytorch_model.bin").exists()
    assert (entry / "m2pt_gguf.json").is_file()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary or stale folder left


# -- chat templates: rendered within bounds on size and time ---------------------------------------


def test_a_chat_template_that_builds_gigabytes_is_refused_quickly(tmp_path, cache):
    """Was: training killed at 3.5 GiB after 24 s. Now refused while the file is checked, before
    anything is converted (the same path ``train`` takes; ``info`` has the smaller baseline)."""
    template = "{% set pad = 'x' * 2500000000 %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    write_gguf(tmp_path / "evil.gguf", chat_template=template)
    result = run_measured("info", recipe(tmp_path, "./evil.gguf"), env={"M2PT_CACHE": str(cache)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "tokenizer.chat_template refused (SecurityError: 'the chat template repeats to 2,500,000,000" in lines[0]
    assert lines[0].isprintable() and len(lines[0]) < 400
    assert nothing_in(cache)
    assert result.peak_bytes < PEAK_BOUND, f"peak {result.peak_bytes / 2**30:.2f} GiB"
    assert result.seconds < 60


def test_training_on_a_gguf_with_a_hostile_template_writes_nothing(tmp_path, cache):
    write_gguf(tmp_path / "evil.gguf", chat_template="{% set pad = 'x' * 2500000000 %}hi")
    model = {"backbone": "openclip_vicuna", "name_or_path": "./evil.gguf", "vision_tower": "ViT-S-32"}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model": model, "data": {"sources": [{"format": "digits", "limit": 4}]}}))
    refused(["train", path, "--output-dir", tmp_path / "run"], tmp_path, "tokenizer.chat_template refused")
    assert nothing_in(cache)


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{{ ''.__class__.__mro__ }}", "SecurityError: \"access to attribute '__class__' of 'str' object is unsafe"),
        ("{% for m in messages %}{{ m.content ", "TemplateSyntaxError: "),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError: 'maximum recursion depth"),
    ],
)
def test_a_chat_template_the_sandbox_refuses_is_one_line(tmp_path, cache, template, needle):
    write_gguf(tmp_path / "evil.gguf", chat_template=template)
    refused(["info", recipe(tmp_path, "./evil.gguf")], tmp_path, "tokenizer.chat_template refused", needle)
    assert nothing_in(cache)


def test_an_architecture_transformers_does_not_read_is_one_line(tmp_path, cache):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "evil.gguf"), "evilarch")
    writer.add_uint32("evilarch.block_count", 1)
    writer.add_tensor("blk.0.w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused(["info", recipe(tmp_path, "./evil.gguf")], tmp_path, "transformers cannot read", "evilarch")
    assert nothing_in(cache)
