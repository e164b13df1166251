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


# ----------------------------------------------------------------------------- #37: refused before any cost


BAD_VALUES = [
    (["train.max_steps=0"], "train.max_steps: must be 1 or more, or -1 (train by train.epochs), got 0"),
    (["train.max_steps=-5"], "train.max_steps: must be 1 or more, or -1"),
    (["train.learning_rate=nan"], "train.learning_rate: must be a finite number above 0, got nan"),
    (["train.learning_rate=inf"], "train.learning_rate: must be a finite number above 0, got inf"),
    (["train.learning_rate=-0.001"], "train.learning_rate: must be a finite number above 0"),
    (["train.warmup_ratio=2"], "train.warmup_ratio: must be a finite number at least 0 and at most 1"),
    (["seed=-3"], "seed: must be 0 to 4294967295"),
    (["prompts.text.length=10000000"], "prompts.text.length: 10000000 is over prompts.length_limit (1024)"),
    (["prompts.vision.layers=0-99999999"], "prompts.vision.layers: layer 4 is out of range; the model has 4"),
    (["prompts.text.layers=[0, 40]"], "prompts.text.layers: layer 40 is out of range; the model has 4 layers (0-3)"),
    (["prompts.text.layers=-5"], "prompts.text.layers: layer -5 is out of range"),
    (["method=lora", "lora.rank=100000"], "lora.rank: 100000 is over the language model's width (64)"),
    (['name="two\\nlines"', "--output-dir", None], "name: 'two\\nlines' is not allowed"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_bad_values_are_refused_before_data_or_weights_load(train_recipe, tmp_path, overrides, message):
    """One line, exit 2, and the folder as it was: no run folder is left behind."""
    from tests.helpers import refused

    if None in overrides:  # the name makes the run folder: no --output-dir
        refused(("train", train_recipe, *overrides[:-2]), tmp_path, message, cwd=tmp_path)
        return
    refused(("train", train_recipe, *overrides, "--output-dir", tmp_path / "run"), tmp_path, message)


@pytest.mark.bad_input
def test_layers_are_checked_from_the_config_before_the_weights(train_recipe, tiny_llava_dir, tmp_path):
    """A model folder without its weights: the layer range is refused first (read from config.json);
    without the bad range the same command reaches the weights and fails there."""
    from tests.helpers import refused

    model = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    args = ("train", train_recipe, f"model.name_or_path={model}", "--output-dir", tmp_path / "run")
    refused((*args, "prompts.vision.layers=2-7"), tmp_path, "prompts.vision.layers: layer 4 is out of range")
    result = m2pt(*args, "train.max_steps=1", check=False)
    assert result.returncode != 0 and "no file named model.safetensors" in error_line(result.stderr), result.stderr


@pytest.mark.slow  # a real process, to measure its memory
def test_a_huge_layer_range_costs_no_memory(train_recipe, tmp_path):
    """``0-99999999`` took 4.6 GB before a misleading error; now it is refused at a few hundred MB."""
    measure = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(r.stderr)\n"
    )
    command = [sys.executable, "-m", "m2pt_cli", "train", str(train_recipe), "prompts.text.layers=0-99999999"]
    command += ["--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, env=env)
    code, max_rss_kib = map(int, result.stdout.split())
    assert code == 2 and "layer 4 is out of range" in result.stderr, result.stderr[-2000:]
    assert max_rss_kib < 1_500_000, max_rss_kib  # torch alone is ~400 MB; the list was 4.6 GB
    assert not (tmp_path / "run").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "output",
    [
        lambda run: run / "adapter",
        lambda run: run,
        lambda run: run / "checkpoint-2",
        lambda run: run / "adapter" / "inside",
        lambda run: run / "checkpoint-8" / "x",
        lambda run: run / "export-x" / ".." / "adapter",
        lambda run: run / "." / "adapter",
    ],
    ids=["adapter", "run", "checkpoint", "inside-adapter", "inside-checkpoint", "dot-dot", "dot"],
)
@pytest.mark.parametrize("flags", [(), ("--overwrite", "--dtype", "bfloat16"), ("--format", "hf", "--overwrite")])
def test_export_never_writes_over_its_own_run(finished_run, output, flags):
    from tests.helpers import refused

    target = output(finished_run)
    refused(("export", finished_run, "--output", target, *flags), finished_run, "an export never writes over")


@pytest.mark.bad_input
def test_export_onto_itself_or_through_a_link_to_its_run_is_refused(finished_run, tmp_path):
    from tests.helpers import refused

    out = tmp_path / "exported"
    m2pt("export", finished_run, "--output", out)
    refused(("export", out, "--output", out, "--overwrite"), tmp_path, "is the adapter being exported")
    link = tmp_path / "link"
    link.symlink_to(finished_run / "adapter")
    refused(("export", finished_run, "--output", link, "--overwrite"), finished_run, "is the adapter being exported")


def test_export_into_a_new_folder_inside_its_run_is_allowed(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    m2pt("export", run, "--output", run / "for-sharing")
    m2pt("export", run / "checkpoint-2", "--output", run / "export-step2")
    assert (run / "for-sharing" / "adapter.safetensors").is_file() and (run / "export-step2").is_dir()


LONG = "n" * 300


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "make",
    [
        lambda t, r, run: ("train", r, "--output-dir", t / LONG),
        lambda t, r, run: ("train", r, "--output-dir", t / "sub" / LONG / "x"),
        lambda t, r, run: ("eval", "--bench", "demo", "--adapter", run, "--output-dir", t / "sub" / LONG),
        lambda t, r, run: ("export", run, "--output", t / LONG),
        lambda t, r, run: ("sweep", r, "--grid", "prompts.text.length=0,2", "--output-dir", t / LONG),
    ],
    ids=["train", "train-nested", "eval", "export", "sweep"],
)
def test_a_name_over_the_file_systems_limit_is_one_line(train_recipe, finished_run, tmp_path, make):
    from tests.helpers import refused

    refused(make(tmp_path, train_recipe, finished_run), tmp_path, "name too long for the file system", "(300 bytes")


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["file", "gguf-file"])
def test_m2pt_cache_that_is_a_file_is_one_line(tmp_path, where):

    from tests.gguf_factory import write_gguf

    write_gguf(tmp_path / "model.gguf")  # a whole (tiny) GGUF: the header checks pass, the cache is next
    cache = tmp_path / "cache"
    if where == "file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        (cache / "gguf").write_text("not a folder")
    args = ("info", "demo", f"model.name_or_path={tmp_path / 'model.gguf'}")
    before = snapshot_of(tmp_path)
    result = m2pt(*args, check=False, env={"M2PT_CACHE": str(cache)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "exists and is not a folder" in result.stderr, result.stderr
    assert "$M2PT_CACHE" in result.stderr and snapshot_of(tmp_path) == before


def snapshot_of(folder: Path):
    from tests.helpers import snapshot

    return snapshot(folder)


@pytest.mark.bad_input
@pytest.mark.parametrize("image", ["/dev/zero", "/dev/null"])
def test_generate_refuses_an_image_that_is_not_a_regular_file(exported, image):
    result = m2pt("generate", "--adapter", exported, "--image", image, "--prompt", "hi", check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert f"--image {image}: not a regular file" in result.stderr


def test_a_data_image_that_is_a_device_says_so():
    from m2pt_cli.data.images import _opened, _Refused

    with pytest.raises(_Refused, match="image path is not a regular file"), _opened("/dev/zero", 100):
        pass
    with pytest.raises(_Refused, match="image file missing"), _opened("/no/such/image.png", 100):
        pass


def test_the_kernels_trust_notice_never_reaches_the_terminal():
    """bitsandbytes' import asks the ``kernels`` package for a hub kernel on CPUs with AVX512-BF16; offline
    it logs "Skipping publisher trust check" on every train and sweep. m2pt filters that one line."""
    code = (
        "import logging, m2pt_cli\n"
        "logging.getLogger('kernels._internals.hf_hub').warning("
        "\"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging "
        'Face Hub is in offline mode.")\n'
        "try:\n"
        "    from kernels._internals.hf_hub import _check_trust_remote_code\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    _check_trust_remote_code('kernels-community/quantization-bitsandbytes', True, False)\n"
        "logging.getLogger('kernels._internals.hf_hub').warning('another kernels warning')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "another kernels warning"  # the filter is that line's alone
