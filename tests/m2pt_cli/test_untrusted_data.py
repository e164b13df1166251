"""Strangers' data sets: no foreign decoders, no decompression bombs, no network, no climbing out.

Every case uses a real payload: an EPS program named ``.png``, PNGs of a few KB that declare
81 to 400 megapixels, image URLs pointing at a local HTTP server that counts its requests, and
``../`` paths to a real image outside the image folder.
"""

from __future__ import annotations

import http.server
import io
import json
import re
import struct
import threading
import warnings
import zlib

import pytest
import yaml
from PIL import Image
from transformers import AutoProcessor

from m2pt_cli import config
from m2pt_cli.backbones.llava import LlavaBackbone
from m2pt_cli.config import DataCfg, SourceCfg
from m2pt_cli.data.build import prepare
from m2pt_cli.data.collate import TrainCollator
from m2pt_cli.data.images import DEFAULT_MAX_PIXELS, LEAVES_FOLDER, PIL_PIXEL_LIMIT, REMOTE
from m2pt_cli.data.sources import load_table
from m2pt_cli.errors import UserError
from m2pt_cli.evaluate import to_rgb
from tests.helpers import m2pt, snapshot

BACKBONE = LlavaBackbone()
EPS_REFUSED = "image format EPS is not allowed (allowed: PNG, JPEG, WEBP, BMP, GIF)"
OVER = f"image has more pixels than data.max_image_pixels allows ({DEFAULT_MAX_PIXELS})"
# 9000^2 is over m2pt's bound only; 10000^2 is where PIL warns; 20000^2 is where PIL raises
BOMB_SIDES = (9000, 10000, 20000)


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


def png(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def eps(marker) -> bytes:
    """An EPS program that writes ``marker`` when a PostScript interpreter (Ghostscript) runs it."""
    return (
        "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
        f"({marker}) (w) file closefile\nnewpath 0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n"
    ).encode()


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels, all black: a few KB that decode to gigabytes as RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def turns(question="What is it?"):
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}]


def llava_source(folder, records, images: dict[str, bytes], image_folder=None) -> SourceCfg:
    """A ``llava_json`` source: ``records`` are (id, image name) pairs; ``images`` the files to write."""
    image_folder = image_folder or folder / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    for name, content in images.items():
        (image_folder / name).write_bytes(content)
    path = folder / "data.json"
    path.write_text(json.dumps([{"id": rid, "image": image, "conversations": turns()} for rid, image in records]))
    return SourceCfg(format="llava_json", path=str(path), image_folder=str(image_folder))


def error_line(result) -> str:
    """The one line m2pt wrote about a failure (exit 2, no traceback; progress bars share stderr)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    ours = [line.split("\r")[-1] for line in result.stderr.splitlines() if "m2pt: " in line]
    assert len(ours) == 1 and ours[0].startswith("m2pt: "), result.stderr[-2000:]
    return ours[0]


def write_parquet(path, rows: dict, features):
    """A parquet file with datasets' feature metadata, written by pyarrow: ``Dataset.to_parquet``
    would itself read (fetch) the URLs the rows name, to embed them."""
    import datasets
    import pyarrow.parquet as pq

    pq.write_table(datasets.Dataset.from_dict(rows, features=features).data.table, str(path))
    return path


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET or HEAD with a valid PNG, so a fetch would also make the record look good."""

    def do_GET(self):  # noqa: N802 - the http.server hook name
        self.server.hits.append(self.path)
        body = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 (base URL, list of requested paths)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.hits
    httpd.shutdown()
    httpd.server_close()


# ----------------------------------------------------------------------------- foreign formats


def test_eps_named_png_is_refused_and_never_interpreted(processor, tmp_path):
    marker = tmp_path / "MARKER"
    source = llava_source(
        tmp_path, [("ok", "ok.png"), ("evil", "evil.png")], {"ok.png": png(), "evil.png": eps(marker)}
    )
    evil = tmp_path / "images" / "evil.png"
    with Image.open(evil) as img:  # the payload is real: PIL left alone identifies it and would run Ghostscript
        assert img.format == "EPS"

    train, _, report = prepare(DataCfg(sources=[source]), processor, BACKBONE, "processor", seed=0)
    assert train["id"] == ["ok"] and report.skipped == {EPS_REFUSED: 1} and report.skipped_ids == ["evil"]

    with pytest.raises(UserError, match=r"^data.sources\[0\]: record evil: image format EPS is not allowed") as exc:
        prepare(DataCfg(sources=[source], on_bad_record="error"), processor, BACKBONE, "processor", seed=0)
    assert "\n" not in str(exc.value) and "PNG, JPEG, WEBP, BMP, GIF" in str(exc.value)

    rows = [
        {"id": "ok", "image": {"bytes": png(), "path": None}, "input_ids": [1, 2], "labels": [-100, 2]},
        {"id": "evil", "image": {"bytes": None, "path": str(evil)}, "input_ids": [1, 2], "labels": [-100, 2]},
        {"id": "evil-bytes", "image": {"bytes": eps(marker), "path": None}, "input_ids": [1, 2], "labels": [-100, 2]},
    ]
    for row in rows:
        row["conversations"] = turns()
    skip = TrainCollator(processor, BACKBONE, "skip")
    assert skip(rows)["input_ids"].shape[0] == 1 and skip.dropped == 2
    with pytest.raises(UserError, match=re.escape(f"record evil: {EPS_REFUSED}")):
        TrainCollator(processor, BACKBONE, "error")(rows)
    with pytest.raises(UserError, match=re.escape(f"record s1: {EPS_REFUSED}")):
        to_rgb({"bytes": eps(marker), "path": None}, "s1")
    assert not marker.exists()


# ----------------------------------------------------------------------------- decompression bombs


def test_pixel_bombs_are_skipped_and_counted_before_any_decoding(processor, tmp_path):
    bombs = {f"big-{side}.png": bomb_png(side) for side in BOMB_SIDES}
    for side in BOMB_SIDES:  # tiny files that declare far more pixels than the bound
        assert len(bombs[f"big-{side}.png"]) < 60_000 and side * side > DEFAULT_MAX_PIXELS
    records = [("ok", "ok.png")] + [(f"big-{side}", f"big-{side}.png") for side in BOMB_SIDES]
    source = llava_source(tmp_path, records, {"ok.png": png(), **bombs})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _, report = prepare(DataCfg(sources=[source]), processor, BACKBONE, "processor", seed=0)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert train["id"] == ["ok"] and report.kept == 1
    assert report.skipped == {OVER: 3} and report.skipped_ids == ["big-9000", "big-10000", "big-20000"]
    assert f"data: skipped 3 records: {OVER}" in report.lines()


def test_pixel_bomb_under_the_error_policy_is_one_line_naming_the_record(processor, tmp_path):
    source = llava_source(
        tmp_path, [("ok", "ok.png"), ("big", "big.png")], {"ok.png": png(), "big.png": bomb_png(20000)}
    )
    with pytest.raises(UserError) as exc:
        prepare(DataCfg(sources=[source], on_bad_record="error"), processor, BACKBONE, "processor", seed=0)
    message = str(exc.value)
    assert message.startswith(f"data.sources[0]: record big: {OVER}") and "\n" not in message


def test_pixel_bombs_at_load_time_follow_the_policy(processor):
    rows = [
        {"id": "ok", "image": {"bytes": png(), "path": None}, "input_ids": [1, 2], "labels": [-100, 2]},
        *(
            {"id": f"big-{s}", "image": {"bytes": bomb_png(s), "path": None}, "input_ids": [1], "labels": [-100]}
            for s in BOMB_SIDES
        ),
    ]
    for row in rows:
        row["conversations"] = turns()
    skip = TrainCollator(processor, BACKBONE, "skip")
    assert skip(rows)["pixel_values"].shape[0] == 1 and skip.dropped == 3
    with pytest.raises(UserError, match=re.escape(f"record big-9000: {OVER}")):
        TrainCollator(processor, BACKBONE, "error")(rows)
    with pytest.raises(UserError, match=re.escape(f"record q7: {OVER}")):
        to_rgb({"bytes": bomb_png(10000), "path": None}, "q7")


def test_max_image_pixels_is_a_recipe_key_below_pils_own_limit(processor, tmp_path, tiny_recipe):
    assert Image.MAX_IMAGE_PIXELS == PIL_PIXEL_LIMIT and DEFAULT_MAX_PIXELS < PIL_PIXEL_LIMIT
    source = llava_source(tmp_path, [("ok", "ok.png")], {"ok.png": png((32, 32))})
    train, _, _ = prepare(DataCfg(sources=[source], max_image_pixels=32 * 32), processor, BACKBONE, "processor", seed=0)
    assert train["id"] == ["ok"]
    with pytest.raises(UserError, match=r"record ok: image has more pixels than data.max_image_pixels allows \(1023\)"):
        cfg = DataCfg(sources=[source], max_image_pixels=1023, on_bad_record="error")
        prepare(cfg, processor, BACKBONE, "processor", seed=0)
    assert config.load(tiny_recipe).data.max_image_pixels == DEFAULT_MAX_PIXELS
    assert config.load(tiny_recipe, ["data.max_image_pixels=4000"]).data.max_image_pixels == 4000
    for bad in (0, PIL_PIXEL_LIMIT + 1):
        with pytest.raises(UserError, match=f"data.max_image_pixels: must be between 1 and {PIL_PIXEL_LIMIT}"):
            config.load(tiny_recipe, [f"data.max_image_pixels={bad}"])


# ----------------------------------------------------------------------------- the network


def _hf_remote_source(tmp_path, kind: str, url: str) -> SourceCfg:
    import datasets

    remote = [("r-http", f"{url}/cat.png"), ("r-s3", "s3://bucket/cat.png"), ("r-hf", "hf://datasets/a/b/c.png")]
    if kind == "parquet":  # an Image feature that names a URL: datasets' decoder would fetch it
        rows = {
            "id": ["ok"] + [rid for rid, _ in remote],
            "image": [{"bytes": png(), "path": None}] + [{"bytes": None, "path": ref} for _, ref in remote],
            "question": ["Colour?"] * 4,
            "answer": ["red"] * 4,
        }
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
            }
        )
        path = write_parquet(tmp_path / "qa.parquet", rows, features)
    else:  # a JSON Lines file whose image column is a URL string (m2pt casts it to an image)
        (tmp_path / "ok.png").write_bytes(png())
        lines = [{"id": "ok", "image": str(tmp_path / "ok.png"), "question": "Colour?", "answer": "red"}]
        lines += [{"id": rid, "image": ref, "question": "Colour?", "answer": "red"} for rid, ref in remote]
        path = tmp_path / "qa.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return SourceCfg(format="hf", path=str(path))


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_remote_images_in_an_hf_source_are_refused_never_fetched(processor, tmp_path, server, kind):
    url, hits = server
    source = _hf_remote_source(tmp_path, kind, url)
    train, _, report = prepare(DataCfg(sources=[source]), processor, BACKBONE, "processor", seed=0)
    assert hits == []
    assert train["id"] == ["ok"] and report.skipped == {REMOTE: 3}
    with pytest.raises(UserError) as exc:
        prepare(DataCfg(sources=[source], on_bad_record="error"), processor, BACKBONE, "processor", seed=0)
    assert str(exc.value).startswith(f"data.sources[0]: record r-http: {REMOTE}") and "\n" not in str(exc.value)
    assert hits == []


def _eval_parquet(path, url: str):
    import datasets

    rows = {
        "id": ["ok", "remote"],
        "image": [{"bytes": png(), "path": None}, {"bytes": None, "path": f"{url}/cat.png"}],
        "question": ["Colour?", "Colour?"],
        "answer": ["red", "red"],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    return write_parquet(path, rows, features)


def test_remote_image_in_eval_data_is_refused_never_fetched(tmp_path, server):
    from m2pt_cli.benches import BENCHES

    url, hits = server
    data = _eval_parquet(tmp_path / "eval.parquet", url)
    samples = list(BENCHES.get("qa").samples(str(data), None, False))
    assert [s.id for s in samples] == ["ok", "remote"] and hits == []
    assert to_rgb(samples[0].image, "ok").size == (32, 32)
    with pytest.raises(UserError, match=re.escape(f"record remote: {REMOTE}")):
        to_rgb(samples[1].image, "remote")
    assert hits == []


def test_eval_cli_refuses_a_remote_image_without_fetching_it(tmp_path, server, tiny_recipe):
    url, hits = server
    data = _eval_parquet(tmp_path / "eval.parquet", url)
    out = tmp_path / "eval"
    args = ["eval", "--bench", "qa", "--recipe", tiny_recipe, "--base", "--data", data, "--output-dir", out]
    result = m2pt(*args, "--batch-size", "1", check=False)
    assert "record remote: image is a remote reference (URL)" in error_line(result)
    assert hits == []


def test_load_table_leaves_every_image_undecoded(tmp_path):
    import datasets

    features = datasets.Features({"frames": datasets.List(datasets.Image()), "image": datasets.Image()})
    rows = {"frames": [[{"bytes": png(), "path": None}]], "image": [{"bytes": png(), "path": None}]}
    path = tmp_path / "nested.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    table = load_table(str(path), "train")
    assert table.features["image"].decode is False and table.features["frames"].feature.decode is False
    row = table[0]
    assert set(row["image"]) == {"bytes", "path"} and set(row["frames"][0]) == {"bytes", "path"}


# ----------------------------------------------------------------------------- paths out of the image folder


def test_llava_json_image_paths_may_not_leave_the_image_folder(processor, tmp_path, server):
    url, hits = server
    real = tmp_path / "shared-storage" / "images"
    (real / "sub").mkdir(parents=True)
    (real / "ok.png").write_bytes(png())
    secret = tmp_path / "shared-storage" / "secret.png"
    secret.write_bytes(png())  # a real image: only the path check keeps it out
    link = tmp_path / "images"
    link.symlink_to(real, target_is_directory=True)  # clusters link image folders to shared storage
    records = [
        ("ok", "ok.png"),
        ("inside", "sub/../ok.png"),
        ("up", "../secret.png"),
        ("deep", "sub/../../secret.png"),
        ("absolute", str(secret)),
        ("url", f"{url}/ok.png"),
    ]
    source = llava_source(tmp_path, records, {}, image_folder=link)
    train, _, report = prepare(DataCfg(sources=[source]), processor, BACKBONE, "processor", seed=0)
    assert sorted(train["id"]) == ["inside", "ok"]
    assert report.skipped == {LEAVES_FOLDER: 3, REMOTE: 1} and report.skipped_ids == ["up", "deep", "absolute", "url"]
    assert hits == []
    with pytest.raises(UserError, match=rf"^data.sources\[0\]: record up: {LEAVES_FOLDER} \("):
        prepare(DataCfg(sources=[source], on_bad_record="error"), processor, BACKBONE, "processor", seed=0)


# ----------------------------------------------------------------------------- through the CLI


def test_train_cli_stops_on_a_pixel_bomb_with_one_line(tmp_path, tiny_recipe):
    data = tmp_path / "data"
    source = llava_source(data, [("ok", "ok.png"), ("big", "big.png")], {"ok.png": png(), "big.png": bomb_png(20000)})
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe["data"] = {
        "sources": [{"format": "llava_json", "path": source.path, "image_folder": source.image_folder}],
        "on_bad_record": "error",
    }
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = snapshot(tmp_path)
    result = m2pt("train", path, "--output-dir", tmp_path / "run", check=False)
    line = error_line(result)
    assert line.startswith(f"m2pt: error: data.sources[0]: record big: {OVER}"), line
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
