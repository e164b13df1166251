"""Strangers' files read within bounds, and what they hold never reaching the terminal raw (issue #36,
second round; #37's data-file errors).

Each class of file is built here (adapters, adapter metadata, predictions, bench data, images that
bench data names, recipe names) and each case asserts exit 2, one printable line of bounded length,
and nothing written. The memory and time attacks run in a real process whose peak RSS and wall time
are measured (generous bounds: what matters is that they do not grow with the file). Big files are
sparse (``truncate``) or written from a repeated chunk, and removed afterwards.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from m2pt_cli.errors import LINE_CHARS, QUOTE_CHARS, one_line, quote
from tests.helpers import REPO, m2pt

GiB = 1 << 30
MAX_RSS = 1 * GiB  # what a refusal may cost, whatever the file's size (m2pt with torch imported: ~0.5 GiB)
MAX_SECONDS = 60

# Runs the CLI and writes its peak RSS (KiB) to $RSS_FILE, whatever the exit: VmHWM of
# /proc/self/status (getrusage's ru_maxrss would keep the pytest worker's peak across fork and exec).
RUN = (
    "import os\n"
    "from m2pt_cli.cli import main\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    peak = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
    "    open(os.environ['RSS_FILE'], 'w').write(peak)\n"
)


def refused_line(result) -> str:
    """The one line m2pt printed for a refusal: exit 2, no traceback, printable, bounded."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line.split("\r")[-1] for line in result.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("m2pt: ")]
    assert len(ours) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = ours[0]
    assert line.isprintable() and len(line) <= len("m2pt: error: ") + LINE_CHARS, line[:300]
    return line


def measured(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run ``m2pt ARGS`` in a new process: (result, peak RSS in bytes, wall seconds)."""
    rss_file = tmp_path / "rss"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RSS_FILE": str(rss_file), "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    command = [sys.executable, "-c", RUN, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    seconds = time.monotonic() - started
    return result, int(rss_file.read_text()) * 1024, seconds


def nothing_written(folder: Path) -> None:
    assert not folder.exists() or not any(p.is_file() for p in folder.rglob("*")), list(folder.rglob("*"))


def png(path: Path, color=(200, 30, 30)) -> Path:
    Image.new("RGB", (16, 16), color).save(path)
    return path


# ----------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapter(tiny_recipe, tmp_path_factory) -> Path:
    """An untrained adapter of the tiny LLaVA (prompts and projector), as m2pt writes one."""
    from m2pt_cli import config, loading
    from m2pt_cli.adapter import write_adapter
    from m2pt_cli.trainer import adapter_meta

    recipe = config.load(tiny_recipe)
    model, _ = loading.build(recipe)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    extra = {"recipe.yaml": config.dump(recipe)}
    return write_adapter(folder, model.adapter_state_dict(), adapter_meta(recipe, model), extra_files=extra)


def forged(adapter: Path, tmp_path: Path, header: dict, data_bytes: int, padding: int = 0) -> Path:
    """A copy of ``adapter`` whose tensor file holds ``header`` and ``data_bytes`` of data (sparse),
    plus ``padding`` bytes, with a checksum in ``m2pt_adapter.json`` that matches it (as an attacker
    can compute one) when the file is small enough to hash here."""
    import hashlib
    import shutil

    folder = tmp_path / "forged"
    shutil.copytree(adapter, folder)
    text = json.dumps(header, separators=(",", ":")).encode()
    weights = folder / "adapter.safetensors"
    with open(weights, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + data_bytes + padding)
    meta = json.loads((folder / "m2pt_adapter.json").read_text())
    if weights.stat().st_size < 256 << 20:
        meta["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "m2pt_adapter.json").write_text(json.dumps(meta))
    return folder


def eval_adapter(tiny_recipe, folder: Path, out: Path) -> tuple[str, ...]:
    data = out.parent / "one.jsonl"
    data.write_text(json.dumps({"image": "x.png", "question": "q", "answer": "a"}) + "\n")
    return ("eval", "--bench", "qa", "--recipe", tiny_recipe, "--adapter", folder, "--data", data, "--output-dir", out)


def test_a_million_empty_tensors_are_refused_from_the_header_size_at_once(adapter, tiny_recipe, tmp_path):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(1_000_000)}
    folder = forged(adapter, tmp_path, header, 0)
    result, rss, seconds = measured(tmp_path, *eval_adapter(tiny_recipe, folder, tmp_path / "out"))
    line = refused_line(result)
    assert "adapter.safetensors: its header claims" in line and "at most 8,388,608" in line
    assert rss < MAX_RSS and seconds < MAX_SECONDS, (rss, seconds)
    nothing_written(tmp_path / "out")


def test_too_many_tensors_are_refused_by_count_before_anything_else(adapter, tiny_recipe, tmp_path):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20_000)}
    folder = forged(adapter, tmp_path, header, 0)
    line = refused_line(m2pt(*eval_adapter(tiny_recipe, folder, tmp_path / "out"), check=False))
    assert "holds 20,000 tensors; an adapter holds at most 16,384" in line
    nothing_written(tmp_path / "out")


def tiled(shapes: dict[str, list[int]]) -> tuple[dict, int]:
    """A safetensors header of float32 tensors laid end to end, and its data size."""
    header, start = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [start, start + size]}
        start += size
    return header, start


def test_a_terabyte_sparse_adapter_is_refused_before_it_is_hashed(adapter, tiny_recipe, tmp_path):
    from m2pt_cli.adapter import tensor_shapes

    shapes = {name: list(shape) for name, shape in tensor_shapes(adapter).items()}
    tera = [1 << 38]  # float32: 1 TiB
    cases = {
        "padded": (shapes, 1 << 40, "its header describes"),  # a valid header, then a terabyte of nothing
        "huge prompts": ({**shapes, "vision_prompts": tera}, 0, "holds vision_prompts of shape (274877906944,)"),
        "huge unknown": ({**shapes, "zz": tera}, 0, "holds 274,877,"),
    }
    for name, (layout, padding, needle) in cases.items():
        header, size = tiled(layout)
        folder = forged(adapter, tmp_path / name, header, size, padding)
        assert (folder / "adapter.safetensors").stat().st_size >= 1 << 40
        result, rss, seconds = measured(tmp_path, *eval_adapter(tiny_recipe, folder, tmp_path / name / "out"))
        assert needle in refused_line(result), name
        assert rss < MAX_RSS and seconds < MAX_SECONDS, (name, rss, seconds)
        nothing_written(tmp_path / name / "out")
        (folder / "adapter.safetensors").unlink()


def without_base(folder: Path, base: str = "someone/not-in-the-cache") -> Path:
    """``folder`` with its recipe naming a base whose config is not here (a hub id not cached)."""
    recipe = folder / "recipe.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["model"]["name_or_path"] = base
    recipe.write_text(yaml.safe_dump(data))
    return folder


def test_export_refuses_a_terabyte_adapter_before_hashing_it(adapter, tmp_path):
    """An honest header declaring a terabyte (the file sparse, as long as it says): ``m2pt export``
    compares it with its base built on the meta device, with its own m2pt_config, and with
    --max-adapter-bytes where the base is not here, each before the file is hashed (minutes)."""
    from m2pt_cli.adapter import tensor_shapes

    shapes = {name: list(shape) for name, shape in tensor_shapes(adapter).items()}
    tera = [1 << 38]  # float32: 1 TiB
    cases = {
        "against the base": ({**shapes, "zz": tera}, False, "holds 274,877,"),
        "against its own config": (
            {**shapes, "text_prompts": tera},
            True,
            "holds text_prompts of shape (274877906944,)",
        ),
        "over the limit": ({**shapes, "zz": tera}, True, "declares 1,099,5"),
    }
    for name, (layout, hide_base, needle) in cases.items():
        header, size = tiled(layout)
        folder = forged(adapter, tmp_path / name, header, size)
        if hide_base:
            without_base(folder)
        assert (folder / "adapter.safetensors").stat().st_size >= 1 << 40
        out = tmp_path / name / "out"
        limit = ("--max-adapter-bytes", "2TiB") if name == "against the base" else ()  # the base refuses it
        result, rss, seconds = measured(tmp_path, "export", folder, "--output", out, *limit)
        line = refused_line(result)
        assert needle in line, (name, line)
        if name == "over the limit":
            assert "over --max-adapter-bytes (34,359,738,368)" in line, line
        assert rss < MAX_RSS and seconds < MAX_SECONDS, (name, rss, seconds)
        nothing_written(out)
        (folder / "adapter.safetensors").unlink()


def test_export_without_its_base_says_why_and_hashes_with_a_progress_bar(adapter, tmp_path):
    """A base that is not here (HF_HUB_OFFLINE, not cached): one log line says why the base check was
    skipped, the file is hashed with a bar, and the export equals the one checked against the base."""
    import shutil

    folder = without_base(shutil.copytree(adapter, tmp_path / "stranger"))
    result = m2pt("export", folder, "--output", tmp_path / "out", process=True)  # the log line: a real stderr
    notes = [line for line in result.stderr.splitlines() if "not compared with its base" in line]
    assert len(notes) == 1 and "'someone/not-in-the-cache' is not in the local hub cache" in notes[0], result.stderr
    assert "hashing adapter.safetensors" in result.stderr, result.stderr
    checked = m2pt("export", adapter, "--output", tmp_path / "checked")
    assert "not compared" not in checked.stderr and "hashing" not in checked.stderr, checked.stderr
    out, ref = tmp_path / "out" / "adapter.safetensors", tmp_path / "checked" / "adapter.safetensors"
    assert out.read_bytes() == ref.read_bytes()
    small = out.stat().st_size
    line = refused_line(m2pt("export", folder, "--output", tmp_path / "x", "--max-adapter-bytes", "1KiB", check=False))
    assert "over --max-adapter-bytes (1,024)" in line, line
    nothing_written(tmp_path / "x")
    m2pt("export", folder, "--output", tmp_path / "raised", "--max-adapter-bytes", str(small))
    assert (tmp_path / "raised" / "adapter.safetensors").read_bytes() == ref.read_bytes()
    bad = m2pt("export", folder, "--output", tmp_path / "y", "--max-adapter-bytes", "10GB", check=False)
    assert bad.returncode == 2 and "'10GB' is not a size" in bad.stderr, bad.stderr  # click's usage error


def test_export_compares_with_a_base_in_the_hub_cache_without_downloading(adapter, tiny_llava_dir, tmp_path):
    """A base named by hub id whose config is in the local hub cache (HF_HUB_OFFLINE=1): the adapter is
    compared with it (a tensor the base cannot hold is refused, no progress bar for a fitting one)."""
    import shutil

    from m2pt_cli.adapter import tensor_shapes

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(tiny_llava_dir / "config.json", repo / "snapshots" / ("0" * 40) / "config.json")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    folder = without_base(shutil.copytree(adapter, tmp_path / "cached"), "someone/tiny-llava")
    result = m2pt("export", folder, "--output", tmp_path / "out", env=env, process=True)
    assert "not compared" not in result.stderr and "hashing" not in result.stderr, result.stderr
    assert (tmp_path / "out" / "adapter.safetensors").is_file()
    shapes = {name: list(shape) for name, shape in tensor_shapes(adapter).items()}
    header, size = tiled({**shapes, "zz": [1 << 24]})  # 64 MiB: under the limit, over what the base holds
    big = without_base(forged(adapter, tmp_path / "big", header, size), "someone/tiny-llava")
    result = m2pt("export", big, "--output", tmp_path / "big-out", env=env, process=True, check=False)
    assert "values; the whole model it adapts has" in refused_line(result)
    nothing_written(tmp_path / "big-out")


def test_export_prompt_shapes_are_checked_against_the_adapters_own_config(adapter, tmp_path):
    import shutil

    folder = without_base(shutil.copytree(adapter, tmp_path / "stranger"))
    config = folder / "m2pt_adapter.json"
    meta = json.loads(config.read_text())
    meta["m2pt_config"]["vision_length"] += 1
    config.write_text(json.dumps(meta))
    line = refused_line(m2pt("export", folder, "--output", tmp_path / "out", check=False))
    assert "holds vision_prompts of shape (3, 3, 32); its m2pt_adapter.json says (3, 4, 32)" in line, line
    meta["m2pt_config"]["vision_length"] -= 1
    meta["m2pt_config"]["text_layers"] = "\x1b[2Jall"
    config.write_text(json.dumps(meta))
    line = refused_line(m2pt("export", folder, "--output", tmp_path / "out", check=False))
    assert "m2pt_config needs text_layers (a list of layer numbers)" in line and "\\x1b" in line, line
    nothing_written(tmp_path / "out")


def test_why_a_base_cannot_be_checked_by_export(tiny_llava_dir, tmp_path):
    from m2pt_cli.export_bounds import unreadable_base

    assert unreadable_base(str(tiny_llava_dir), None) is None
    assert "is not a model folder here" in unreadable_base(str(tmp_path), None)
    assert "is not a model folder here" in unreadable_base(str(tmp_path / "gone"), None)
    assert "not in the local hub cache" in unreadable_base("someone/not-in-the-cache", None)
    assert "not in the local hub cache" in unreadable_base("not a hub id!", None)
    assert "GGUF file" in unreadable_base(str(tmp_path / "model.gguf"), None)


def test_export_never_checks_against_a_base_the_adapter_carries(adapter, tiny_llava_dir, tmp_path):
    """A base inside the adapter folder cannot vouch for the adapter: the check is skipped, not run."""
    import shutil

    from m2pt_cli.adapter import read_meta
    from m2pt_cli.export_bounds import check_base

    folder = shutil.copytree(adapter, tmp_path / "carrier")
    (folder / "base").mkdir()
    shutil.copy(tiny_llava_dir / "config.json", folder / "base" / "config.json")
    without_base(folder, str(folder / "base"))
    assert "a base the adapter carries" in check_base(folder, read_meta(folder))
    assert check_base(adapter, read_meta(adapter)) is None  # its own base is here: compared


def test_the_export_limit_default_is_the_documented_one():
    from m2pt_cli.commands.export import DEFAULT_MAX_BYTES, ByteSize
    from m2pt_cli.export_bounds import MAX_ADAPTER_BYTES

    assert ByteSize().convert(DEFAULT_MAX_BYTES, None, None) == MAX_ADAPTER_BYTES == 32 << 30
    assert "32GiB" in (REPO / "SECURITY.md").read_text()


@pytest.mark.parametrize(
    ("name", "header", "needle"),
    [
        ("header length past the file", None, "its header claims"),
        ("header not JSON", b"{nope", "(header): not valid JSON"),
        ("header a list", [], "the header is not a JSON object"),
        ("header deep", "deep", "nested deeper than 4 levels"),
        (
            "name with escapes",
            {"\x1b[2J\nx": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}},
            "is not a printable name",
        ),
        ("unknown dtype", {"x": {"dtype": "PICKLE", "shape": [0], "data_offsets": [0, 0]}}, "no valid dtype"),
        ("negative shape", {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, "no valid dtype"),
        ("offsets disagree", {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}, "offsets span 4 bytes"),
        (
            "overlap",
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            "overlaps or leaves a gap",
        ),
    ],
)
def test_a_malformed_adapter_header_is_one_line(adapter, tiny_recipe, tmp_path, name, header, needle):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(adapter, folder)
    weights = folder / "adapter.safetensors"
    if header is None:
        weights.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    elif header == "deep":
        text = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        weights.write_bytes(struct.pack("<Q", len(text)) + text)
    else:
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    line = refused_line(m2pt(*eval_adapter(tiny_recipe, folder, tmp_path / "out"), check=False))
    assert needle in line, line
    nothing_written(tmp_path / "out")


def test_adapter_metadata_is_bounded_in_size_and_depth(adapter, tiny_recipe, tmp_path):
    import shutil

    folder = tmp_path / "meta"
    shutil.copytree(adapter, folder)
    config = folder / "m2pt_adapter.json"
    meta = json.loads(config.read_text())
    cases = {
        "50 MB": None,
        "100k deep": b'{"format_version": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "escapes": json.dumps({**meta, "format_version": "\x1b]0;pwned\x07\n" + "x" * 5_000_000}).encode(),
        "a list": b"[1, 2]",
    }
    needles = {
        "50 MB": "m2pt_adapter.json: 52,428,800 bytes; a m2pt_adapter.json is at most 8,388,608 bytes",
        "100k deep": "m2pt_adapter.json: JSON nested deeper than 64 levels",
        "escapes": "adapter format '\\x1b]0;pwned\\x07\\n",
        "a list": "adapter format None",
    }
    for name, content in cases.items():
        if content is None:
            config.write_bytes(b"")
            os.truncate(config, 50 << 20)
        else:
            config.write_bytes(content)
        if name == "50 MB":
            result, rss, seconds = measured(tmp_path, *eval_adapter(tiny_recipe, folder, tmp_path / "out"))
            assert rss < MAX_RSS and seconds < MAX_SECONDS, (rss, seconds)
        else:
            result = m2pt(*eval_adapter(tiny_recipe, folder, tmp_path / "out"), check=False)
        line = refused_line(result)
        assert needles[name] in line, (name, line)
        if name == "escapes":
            assert len(line) < 400, len(line)  # the value is quoted within QUOTE_CHARS
        nothing_written(tmp_path / "out")
    config.unlink()


# ----------------------------------------------------------------------------- predictions files


def test_ten_million_empty_rows_stop_at_line_1_at_once(tmp_path):
    predictions = tmp_path / "preds.jsonl"
    with open(predictions, "wb") as handle:
        chunk = b"{}\n" * 1_000_000
        for _ in range(10):
            handle.write(chunk)
    out = tmp_path / "out"
    result, rss, seconds = measured(
        tmp_path, "eval", "--bench", "qa", "--predictions", predictions, "--output-dir", out
    )
    line = refused_line(result)
    assert f"--predictions: line 1 of {predictions}: no field 'prediction'" in line
    assert rss < MAX_RSS and seconds < MAX_SECONDS, (rss, seconds)
    nothing_written(out)
    predictions.unlink()


def test_a_500_mib_line_is_refused_by_the_line_bound_without_holding_it(tmp_path):
    predictions = tmp_path / "preds.jsonl"
    with open(predictions, "wb") as handle:
        handle.write(b'{"prediction": "')
        handle.truncate(500 << 20)  # one line of 500 MiB (NUL bytes past the start), no line end
    out = tmp_path / "out"
    result, rss, seconds = measured(
        tmp_path, "eval", "--bench", "qa", "--predictions", predictions, "--output-dir", out
    )
    line = refused_line(result)
    assert "line 1 is longer than 16,777,216 bytes" in line
    assert rss < MAX_RSS and seconds < MAX_SECONDS, (rss, seconds)
    nothing_written(out)
    predictions.unlink()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000 + b"\n{}\n", "line 1 is JSON nested deeper than 64 levels"),
        (b"5\n", "line 1 is not a JSON object"),
        (b'{"prediction": "a", "answer": "a"}\nnot json\n{}\n', "line 2 is not JSON"),
        (b'{"prediction": "a", "answer": "a"}\n\xff\xfe\n{}\n', "line 2 is not JSON"),
        (b'{"prediction": "a", "answer": "a"}\n\xff\xfe\n', None),  # a torn last line is dropped
        (b'{"prediction": ["\\u001b[2J"], "answer": "a"}\n', "must be a string (got ['\\x1b[2J'])"),
    ],
)
def test_bad_predictions_lines_are_one_printable_line(tmp_path, content, needle):
    predictions = tmp_path / "preds.jsonl"
    predictions.write_bytes(content)
    out = tmp_path / "out"
    result = m2pt("eval", "--bench", "qa", "--predictions", predictions, "--output-dir", out, check=False)
    if needle is None:  # the rows before a torn last line are scored
        assert result.returncode == 0 and "dropped line 2, torn by an interrupted write" in result.stderr
        assert json.loads((out / "results.json").read_text())["benches"]["qa"]["samples"] == 1
        return
    assert needle in refused_line(result), result.stderr
    nothing_written(out)


# ----------------------------------------------------------------------------- bench data files


def eval_data(tiny_recipe, data: Path, out: Path) -> tuple:
    return (
        "eval",
        "--bench",
        "qa",
        "--recipe",
        tiny_recipe,
        "--base",
        "--data",
        data,
        "--output-dir",
        out,
        "--batch-size",
        "1",
    )


EXPECTED = "expected JSON lines (one object per line) or a JSON array of objects"


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("empty.jsonl", b"", "holds no rows; " + EXPECTED),
        ("blank.json", b"\n  \n", "holds no rows"),
        ("empty-array.json", b"[]", "holds no rows"),
        ("numbers.json", b"[1, 2, 3]", "item 1 is a number (1); " + EXPECTED),
        ("mixed.json", b'[ROW, "x"]', "item 2 is a string ('x')"),
        ("nested.json", b"[[1]]", "item 1 is a list"),
        ("object.json", b'{\n  "question": "q"\n}\n', "line 1: not valid JSON"),
        ("string.jsonl", b'"q"\n', "line 1 is a string"),
        ("null.jsonl", b"null\n", "line 1 is null"),
        ("torn-array.json", b'[ROW, {"quest', "item 2 of the array is not JSON"),
        ("after-array.json", b"[] []", "text after the JSON array"),
        ("no-comma.json", b'[ROW {"b": 2}]', "after item 1 of the array: expected ',' or ']'"),
        ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
        ("deep-array.json", b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", "item 1 is JSON nested deeper"),
        ("binary.jsonl", b"\xff\xfe\x00", "not UTF-8"),
        ("no-columns.jsonl", b"{}\n", "none of the columns image, img"),
    ],
)
def test_bench_data_of_the_wrong_shape_is_one_line_naming_the_file(tiny_recipe, tmp_path, name, content, needle):
    data = tmp_path / name
    data.write_bytes(content.replace(b"ROW", b'{"image": "x.png", "question": "q", "answer": "a"}'))
    out = tmp_path / "out"
    line = refused_line(m2pt(*eval_data(tiny_recipe, data, out), check=False))
    assert needle in line and str(data) in line, line
    assert not out.exists()  # refused before the model is loaded or the folder made


def test_huge_bench_data_files_stop_at_the_first_row_with_bounded_memory(tiny_recipe, tmp_path):
    rows = tmp_path / "rows.jsonl"
    with open(rows, "wb") as handle:
        chunk = b"{}\n" * 1_000_000
        for _ in range(10):
            handle.write(chunk)
    line = tmp_path / "line.jsonl"
    with open(line, "wb") as handle:
        handle.write(b'{"question": "')
        handle.truncate(500 << 20)
    array = tmp_path / "array.json"
    with open(array, "wb") as handle:
        handle.write(b'[{"question": "')
        handle.truncate(500 << 20)
    needles = {
        rows: f"--data {rows}: row 1: bench qa: the data has none of the columns image, img",
        line: "line 1 is longer than 16,777,216 bytes",
        array: "item 1 of the array is longer than 16,777,216 characters",
    }
    for data, needle in needles.items():
        out = tmp_path / f"out-{data.stem}"
        result, rss, seconds = measured(tmp_path, *eval_data(tiny_recipe, data, out))
        assert needle in refused_line(result)
        assert rss < MAX_RSS and seconds < MAX_SECONDS, (data.name, rss, seconds)
        nothing_written(out)
        data.unlink()


# ----------------------------------------------------------------------------- images that bench data names


@pytest.fixture
def image_tree(tmp_path) -> dict[str, Path]:
    """data/ with an image, links out of it (followed: the folder's owner made them), and a file outside
    it that a data file must not name by path (a real image: only the rule keeps it out)."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    png(data / "img" / "ok.png")
    secret = png(tmp_path / "secret.png", (0, 0, 255))
    (data / "img" / "link.png").symlink_to(secret)
    (data / "img" / "outside").symlink_to(tmp_path, target_is_directory=True)
    return {"data": data, "secret": secret}


@pytest.mark.parametrize(
    "image",
    [
        "ABSOLUTE",
        "../secret.png",
        "img/../../secret.png",
        {"bytes": None, "path": "ABSOLUTE"},
        {"path": "../secret.png"},
    ],
)
def test_bench_data_images_stay_inside_the_data_folder(tiny_recipe, image_tree, tmp_path, image):
    secret = str(image_tree["secret"])
    if image == "ABSOLUTE":
        image = secret
    elif isinstance(image, dict) and image["path"] == "ABSOLUTE":
        image = {**image, "path": secret}
    data = image_tree["data"] / "q.jsonl"
    rows = [{"id": "ok", "image": "img/ok.png", "question": "q", "answer": "a"}]
    rows.append({"id": "evil\x1b[31m", "image": image, "question": "q", "answer": "a"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    line = refused_line(m2pt(*eval_data(tiny_recipe, data, out), check=False))
    path = image["path"] if isinstance(image, dict) else image
    assert f"record 'evil\\x1b[31m': image path leaves the image folder ({quote(path)})" in line, line
    assert not (out / "results.json").exists()


def test_bench_data_images_inside_the_folder_are_read(tiny_recipe, image_tree, tmp_path):
    linked = tmp_path / "linked"
    linked.symlink_to(image_tree["data"], target_is_directory=True)  # the data folder itself may be a link
    data = image_tree["data"] / "q.json"
    rows = [
        {"id": "plain", "image": "img/ok.png", "question": "q", "answer": "a"},
        {"id": "dotted", "image": "img/../img/ok.png", "question": "q", "answer": "a"},
        {"id": "dict", "image": {"bytes": None, "path": "img/ok.png"}, "question": "q", "answer": "a"},
        # links inside the folder are its owner's and are followed (image folders linked to shared storage)
        {"id": "linked file", "image": "img/link.png", "question": "q", "answer": "a"},
        {"id": "linked folder", "image": "img/outside/secret.png", "question": "q", "answer": "a"},
    ]
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    m2pt(*eval_data(tiny_recipe, linked / "q.json", out))
    assert json.loads((out / "results.json").read_text())["benches"]["qa"]["samples"] == 5


def test_parquet_bench_data_naming_a_file_outside_is_refused(tiny_recipe, image_tree, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": None, "path": str(image_tree["secret"])}]
    table = pa.table({"id": ["x"], "image": images, "question": ["q"], "answer": ["a"]})
    data = image_tree["data"] / "q.parquet"
    pq.write_table(table, data)
    line = refused_line(m2pt(*eval_data(tiny_recipe, data, tmp_path / "out"), check=False))
    assert f"record x: image path leaves the image folder ({quote(str(image_tree['secret']))})" in line


def test_the_image_rule_is_one_function(tmp_path, image_tree):
    from m2pt_cli.data.images import in_folder

    data = image_tree["data"]
    assert in_folder("img/ok.png", (data,)) == str(data / "img" / "ok.png")
    assert in_folder("img/../img/ok.png", (data,)) == str(data / "img/../img/ok.png")
    for name in ("../secret.png", "img/../../secret.png", str(image_tree["secret"]), "/etc/passwd"):
        assert in_folder(name, (data,)) is None, name
    for name in ("img/link.png", "img/outside/secret.png"):  # links inside the folder are followed
        assert in_folder(name, (data,)) == str(data / name), name
    cache = tmp_path / "cache"
    cache.mkdir()
    png(cache / "a.png")
    assert in_folder(str(cache / "a.png"), (data, cache), absolute=True) == str(cache / "a.png")
    assert in_folder(str(image_tree["secret"]), (data, cache), absolute=True) is None


# ----------------------------------------------------------------------------- terminal output


def test_one_line_escapes_and_bounds_whatever_it_is_given():
    line = one_line("file: \x1b[2J\x1b]0;title\x07 line\nbreak\r\u202e " + "x" * 10_000_000)
    assert line.isprintable() and len(line) == LINE_CHARS and line.endswith("...")
    assert line.startswith("file: \\x1b[2J\\x1b]0;title\\x07 line\\nbreak\\r\\u202e ")
    assert quote("\x1b" * 1000).isprintable() and len(quote("\x1b" * 1000)) <= QUOTE_CHARS
    assert quote("plain-id", bare=True) == "plain-id" and quote("a\nb", bare=True) == "'a\\nb'"


def test_the_cli_prints_any_error_as_one_printable_bounded_line(tmp_path):
    name = "\x1b[31mred\nsecond line\x07.jsonl"
    deep = Path(*["y" * 200] * 15)  # a path of 3,000 characters (each part within the file system's limit)
    line = refused_line(m2pt("eval", "--bench", "qa", "--predictions", tmp_path / name / deep, check=False))
    assert "\\x1b[31mred\\nsecond line\\x07" in line and line.endswith("...")


def test_a_recipe_name_with_control_characters_is_refused(tmp_path, tiny_recipe):
    recipe = yaml.safe_load(Path(tiny_recipe).read_text())
    for name in ("run\x1b[2K", "two\nlines", "tab\there"):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**recipe, "name": name}))
        line = refused_line(m2pt("info", path, check=False))
        assert f"name: {quote(name)} is not allowed" in line and "control characters" in line


def test_info_prints_file_values_escaped(tmp_path, tiny_recipe):
    from m2pt_cli.info import _value, format_report

    report = {"recipe": "r", "model": "\x1b[2Jmodel", "model_keys": {"k": "\x1b]0;t\x07", "j": ["a\n"]}}
    report.update(
        backbone="llava",
        vision={"layers": 1, "width": 1, "prompt_length": 1, "prompt_layers": [0], "unused_layers": []},
        text={"layers": 1, "width": 1, "prompt_length": 1, "prompt_layers": [0]},
        trainable={},
        trainable_total=0,
        total_parameters=1,
        trainable_percent=0.0,
        dtype="float32",
        quantization="none",
        weight_bytes={},
    )
    text = format_report(report)
    assert all(line.isprintable() for line in text.splitlines())
    assert "'\\x1b[2Jmodel'" in text and "..." in _value("x" * 1000) and len(_value("x" * 1000)) <= QUOTE_CHARS
