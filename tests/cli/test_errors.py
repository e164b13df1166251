"""Bad input, interruptions and mismatches through the real CLI: exit code, one-line message, no partial output."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, m2pt

pytestmark = pytest.mark.bad_input


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def recipe_with(base: Path, tmp: Path, **sections) -> Path:
    data = yaml.safe_load(base.read_text())
    for key, value in sections.items():
        data[key] = value
    return write(tmp / "case.yaml", data)


@dataclass
class Case:
    name: str
    make: object  # (tmp, tiny_recipe, train_recipe, exported) -> argv
    message: str
    code: int = 2
    absent: list[str] = field(default_factory=list)  # paths (relative to tmp) that must not exist afterwards
    plugin: bool = False  # runs in a process with the broken plugin backbone installed (plugin_path)


def _llava_json(tmp: Path, records, images: dict[str, bytes] | None = None) -> dict:
    folder = tmp / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (images or {}).items():
        (folder / name).write_bytes(content)
    (folder / "d.json").write_text(json.dumps(records))
    return {
        "sources": [{"format": "llava_json", "path": str(folder / "d.json")}],
        "max_length": 96,
        "on_bad_record": "error",
    }


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _turns(question="<image>\nQ", answer="A"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _bytes(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _with_folder_image(tmp: Path) -> dict:
    data = _llava_json(tmp, [{"id": "f1", "image": "sub", "conversations": _turns()}])
    (tmp / "data" / "sub").mkdir()
    return data


CASES = [
    Case("recipe not UTF-8", lambda t, r, tr, e: ["info", _bytes(t / "r.yaml", b"name: \xff\n")], "not UTF-8 text"),
    Case("empty recipe", lambda t, r, tr, e: ["info", _bytes(t / "r.yaml", b"")], "r.yaml: the recipe is empty"),
    Case(
        "empty data file",
        lambda t, r, tr, e: [
            "train",
            recipe_with(tr, t, data={"sources": [{"format": "llava_json", "path": str(_bytes(t / "d.json", b""))}]}),
            "--output-dir",
            t / "run",
        ],
        "d.json: not valid JSON",
        absent=["run"],
    ),
    Case(
        "image path is a folder",
        lambda t, r, tr, e: ["train", recipe_with(tr, t, data=_with_folder_image(t)), "--output-dir", t / "run"],
        "record f1: image path is a folder",
        absent=["run"],
    ),
    Case(
        "malformed yaml",
        lambda t, r, tr, e: ["info", write(t / "bad.yaml", "model:\n  dtype: [x\n")],
        "bad.yaml: line 3: malformed YAML",
    ),
    Case(
        "unknown key",
        lambda t, r, tr, e: ["info", r, "prompts.vison.length=2"],
        "unknown key 'prompts.vison'; did you mean 'vision'?",
    ),
    Case(
        "quantization typo",
        lambda t, r, tr, e: ["info", r, "model.quantization=4bits"],
        "model.quantization: '4bits'",
    ),
    Case(
        "wrong type",
        lambda t, r, tr, e: ["info", r, "prompts.text.length=[1]"],
        "prompts.text.length: expected an integer, got [1]",
    ),
    Case(
        "negative length",
        lambda t, r, tr, e: ["info", r, "prompts.vision.length=-3"],
        "prompts.vision.length: must be 0 or more, got -3",
    ),
    Case(
        "layer out of range",
        lambda t, r, tr, e: ["info", r, "prompts.vision.layers=[7]"],
        "prompts.vision.layers: layer 7 is out of range; the model has 4 layers (0-3)",
    ),
    Case(
        "unknown backbone",
        lambda t, r, tr, e: ["info", r, "model.backbone=llama"],
        "unknown backbone 'llama'; did you mean 'llava'? (available: broken, instructblip, llava, openclip_vicuna)",
        plugin=True,
    ),
    Case(
        "hub model unreachable",
        lambda t, r, tr, e: ["info", r, "model.name_or_path=nobody/no-such-model"],
        "model.name_or_path: cannot load 'nobody/no-such-model': ",
    ),
    Case(
        "model path missing",
        lambda t, r, tr, e: ["info", r, f"model.name_or_path={t}/nowhere"],
        "model.name_or_path: folder",
    ),
    Case("missing recipe", lambda t, r, tr, e: ["train", t / "nope.yaml"], "no such recipe file"),
    Case(
        "missing data file",
        lambda t, r, tr, e: [
            "train",
            tr,
            f"data.sources=[{{format: llava_json, path: {t}/x.json}}]",
            "--output-dir",
            t / "run",
        ],
        "data.sources[0].path: data file",
        absent=["run"],
    ),
    Case(
        "empty dataset",
        lambda t, r, tr, e: ["train", recipe_with(tr, t, data=_llava_json(t, [])), "--output-dir", t / "run"],
        "data: no usable records",
        absent=["run"],
    ),
    Case(
        "missing image",
        lambda t, r, tr, e: [
            "train",
            recipe_with(tr, t, data=_llava_json(t, [{"id": "m1", "image": "gone.png", "conversations": _turns()}])),
            "--output-dir",
            t / "run",
        ],
        "record m1: image file missing",
        absent=["run"],
    ),
    Case(
        "non-image file",
        lambda t, r, tr, e: [
            "train",
            recipe_with(
                tr,
                t,
                data=_llava_json(t, [{"id": "txt", "image": "a.png", "conversations": _turns()}], {"a.png": b"hello"}),
            ),
            "--output-dir",
            t / "run",
        ],
        "record txt: image unreadable",
    ),
    Case(
        "placeholder without image",
        lambda t, r, tr, e: [
            "train",
            recipe_with(tr, t, data=_llava_json(t, [{"id": "p1", "conversations": _turns()}])),
            "--output-dir",
            t / "run",
        ],
        "record p1: more <image> placeholders than images",
    ),
    Case(
        "image without placeholder",
        lambda t, r, tr, e: [
            "train",
            recipe_with(
                tr,
                t,
                data=_llava_json(t, [{"id": "p2", "image": "a.png", "conversations": _turns("Q")}], {"a.png": _png()}),
            ),
            "--output-dir",
            t / "run",
        ],
        "record p2: an image but no <image> placeholder",
    ),
    Case(
        "sample too long",
        lambda t, r, tr, e: [
            "train",
            recipe_with(
                tr,
                t,
                data={
                    **_llava_json(t, [{"id": "long", "image": "a.png", "conversations": _turns()}], {"a.png": _png()}),
                    "max_length": 10,
                },
            ),
            "--output-dir",
            t / "run",
        ],
        "record long: longer than max_length",
    ),
    Case(
        "adapter for another base",
        lambda t, r, tr, e: [
            "generate",
            "--adapter",
            e,
            "--image",
            _image(t),
            "--prompt",
            "Hi",
            "--base-model",
            _other_base(t),
        ],
        "adapter was trained for text_total_layers = 4, this model has 2",
    ),
    Case(
        "truncated adapter",
        lambda t, r, tr, e: ["export", _damaged(t, e), "--output", t / "out"],
        "bytes, its header describes",
        absent=["out"],
    ),
    Case(
        "not an adapter",
        lambda t, r, tr, e: ["export", t, "--output", t / "out"],
        "no m2pt adapter here",
        absent=["out"],
    ),
    Case("run folder taken", lambda t, r, tr, e: ["train", tr, "--output-dir", _taken(t)], "already holds a run"),
    Case("unknown bench", lambda t, r, tr, e: ["eval", "--bench", "popе", "--adapter", e], "unknown bench"),
    Case(
        "device not a name",
        lambda t, r, tr, e: ["eval", "--bench", "demo", "--adapter", e, "--device", "gpu0", "--output-dir", t / "ev"],
        "--device 'gpu0': not a device name (use cpu, cuda or cuda:N)",
        absent=["ev"],
    ),
    Case(
        "device not on this machine",
        lambda t, r, tr, e: ["bench", tr, "--device", "cuda:99", "--output", t / "b.json"],
        "--device cuda:99: ",
        absent=["b.json"],
    ),
    Case(
        "sweep without grid or cell",
        lambda t, r, tr, e: ["sweep", tr, "--output-dir", t / "s"],
        "give at least one --grid",
        absent=["s"],
    ),
    Case(
        "sweep cell without value",
        lambda t, r, tr, e: ["sweep", tr, "--cell", "method", "--output-dir", t / "s"],
        "--cell 'method': expected KEY=VALUE",
        absent=["s"],
    ),
    Case(
        "sweep cell key typo",
        lambda t, r, tr, e: ["sweep", tr, "--cell", "method=lora prompts.txt.length=2", "--output-dir", t / "s"],
        "did you mean 'text'",
        absent=["s"],
    ),
    Case(
        "sweep cell twice",
        lambda t, r, tr, e: [
            "sweep",
            tr,
            "--grid",
            "method=m2pt,lora",
            "--cell",
            "method=lora",
            "--output-dir",
            t / "s",
        ],
        "the cell method=lora is given twice",
        absent=["s"],
    ),
    Case(
        "missing predictions",
        lambda t, r, tr, e: ["eval", "--bench", "mme", "--predictions", t / "p.jsonl"],
        "--predictions: file",
    ),
    Case(
        "unknown export format",
        lambda t, r, tr, e: ["export", e, "--format", "gguf", "--output", t / "o"],
        "unknown export format 'gguf'",
        absent=["o"],
    ),
    Case(
        "broken plugin backbone",
        lambda t, r, tr, e: ["info", r, "model.backbone=broken"],
        "internal error: RuntimeError: plugin exploded (rerun with --debug)",
        code=1,
        plugin=True,
    ),
]


def _image(tmp: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp / "i.png")
    return tmp / "i.png"


def _other_base(tmp: Path) -> Path:
    from m2pt_cli.backbones._tiny import save_tiny_llava, tiny_llava_config

    return save_tiny_llava(tmp / "other", tiny_llava_config(text_layers=2), seed=0)


def _damaged(tmp: Path, exported: Path) -> Path:
    copy = tmp / "damaged"
    shutil.copytree(exported, copy)
    data = (copy / "adapter.safetensors").read_bytes()
    (copy / "adapter.safetensors").write_bytes(data[:-100])
    return copy


def _taken(tmp: Path) -> Path:
    """A run folder holding trained work (a checkpoint)."""
    write(tmp / "taken" / "config.yaml", {"name": "x"})
    (tmp / "taken" / "checkpoint-1").mkdir()
    return tmp / "taken"


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "adapter"
    m2pt("export", finished_run, "--output", out)
    return out


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """A third-party backbone whose load() fails: an internal error, not bad input."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "broken_backbone.py").write_text(
        "from m2pt_cli.backbones.llava import LlavaBackbone\n"
        "class Broken(LlavaBackbone):\n"
        "    def build_empty(self, source):\n"
        "        raise RuntimeError('plugin exploded')\n"
    )
    dist = root / "broken_backbone-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-backbone\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[m2pt.backbones]\nbroken = broken_backbone:Broken\n")
    return str(root)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, tmp_path, tiny_recipe, train_recipe, exported, plugin_path):
    argv = case.make(tmp_path, tiny_recipe, train_recipe, exported)
    env = {"PYTHONPATH": os.pathsep.join([plugin_path, str(REPO)])} if case.plugin else {}  # a real process
    result = m2pt(*argv, check=False, env=env, cwd=tmp_path)
    assert result.returncode == case.code, result.stderr[-2000:]
    assert case.message in error_line(result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for path in case.absent:
        assert not (tmp_path / path).exists(), path
    assert not list(tmp_path.rglob(".*.tmp")) and not list(tmp_path.glob(".out.*")) and not list(tmp_path.glob(".o.*"))


def test_debug_shows_the_traceback(tiny_recipe):
    result = m2pt("--debug", "info", tiny_recipe, "prompts.text.length=-1", check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_full_disk_while_exporting_leaves_nothing(finished_run, tmp_path):
    """RLIMIT_FSIZE makes the write fail with EFBIG, as a full disk would (Python ignores SIGXFSZ)."""

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run(
        [sys.executable, "-m", "m2pt_cli", "export", str(finished_run), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=small_files,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert "cannot write" in line and "File too large" in line and "nothing partial was kept" in line
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_overwrite_replaces_a_run(train_recipe, tmp_path):
    run = _taken(tmp_path)
    (run / "metrics.jsonl").write_text('{"stale": 1}\n')
    m2pt("train", train_recipe, "train.max_steps=1", "--output-dir", run, "--overwrite")
    assert "stale" not in (run / "metrics.jsonl").read_text() and (run / "adapter").is_dir()


def test_nan_loss_stops_with_step_and_checkpoint(train_recipe, tmp_path):
    result = m2pt(
        "train",
        train_recipe,
        "train.learning_rate=1e30",
        "train.warmup_ratio=0",
        "train.max_steps=6",
        "--output-dir",
        tmp_path / "run",
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = error_line(result.stderr)
    assert "loss became nan at step" in last and "last checkpoint:" in last and "learning_rate" in last
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow  # real signals to a real process
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(train_recipe, tmp_path, sig):
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "m2pt_cli",
        "train",
        str(train_recipe),
        "train.max_steps=120",  # seconds of training: the signal lands mid-run, the resume is short
        "train.save_steps=1000",
        "--output-dir",
        str(run),
    ]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # a shell that starts this suite in the background leaves SIGINT ignored in its children, and
        # Python then installs no Ctrl-C handler: give the CLI the disposition a terminal gives it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not any('"loss"' in line for line in _lines(run / "metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last = error_line(stderr)
    assert last.startswith("m2pt: stopped: interrupted at step") and f"--resume {run}" in last
    checkpoints = list(run.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter.safetensors").is_file()
    printed = shlex.split(last.split("resume with: ", 1)[1])  # the printed command, run as printed
    assert printed[:2] == ["m2pt", "train"] and "train.max_steps=120" in printed
    resumed = m2pt(*printed[1:], check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "done: 120 steps" in resumed.stdout


def error_line(stderr: str) -> str:
    """The one line m2pt wrote about the failure (progress bars share stderr)."""
    lines = [line.split("\r")[-1] for line in stderr.splitlines()]
    ours = [line for line in lines if line.startswith("m2pt: ")]
    assert len(ours) == 1, stderr[-2000:]
    return ours[0]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []
