"""lmms-eval with ``--model m2pt`` on a multiple-choice task (lmms-eval asks ``loglikelihood`` of each
choice), offline on local data: every choice's score equals an independent forward of the same
adapter, the accuracy follows from them; and ``accelerate launch --num_processes 2`` (CPU, gloo)
gives the same per-sample outputs and scores as one process, on this task and on MME
(``generate_until``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_lmms_eval import TASK as MME_TASK
from tests.cli.test_lmms_eval import lmms_eval, mme_task, results_file  # noqa: F401 - mme_task is a fixture
from tests.helpers import REPO
from tests.m2pt_cli.test_likelihood import reference

pytestmark = pytest.mark.slow  # lmms-eval's own CLI in real processes

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[dev]' installs it)")

TASK = "mc_local"
# output_type loglikelihood: the answer's perplexity and whether it is greedy. No task of lmms-eval
# 0.7.3 has this output type and its built-in scoring of it unpacks the list of one result as the
# result, so the task scores with its own process_results (as lm-eval-harness' built-in does).
LL_TASK = "ll_local"
CHOICES = ["Yes", "No"]
TASK_YAML = f"""task: "{TASK}"
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {{parquet}}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
LL_YAML = f"""task: "{LL_TASK}"
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {{parquet}}
test_split: test
output_type: loglikelihood
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_answer
process_results: !function utils.ll_results
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = f"""CHOICES = {CHOICES!r}


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return CHOICES


def doc_to_target(doc):
    return CHOICES.index(doc["answer"])


def doc_to_answer(doc):
    return " " + doc["answer"]


def ll_results(doc, results):
    logprob, greedy = results[0]
    return {{"perplexity": float(logprob), "acc": int(greedy)}}
"""


@pytest.fixture(scope="module")
def mc_task(mme_task) -> tuple[Path, Path]:  # noqa: F811 - the fixture imported above
    """(include_path folder, parquet): a yes/no multiple-choice task over MME's local parquet, next to
    the local MME task (one --include_path serves both)."""
    include, parquet = mme_task
    folder = include / TASK
    folder.mkdir(exist_ok=True)
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(parquet=parquet))
    (folder / "utils.py").write_text(TASK_UTILS)
    (include / LL_TASK).mkdir(exist_ok=True)
    (include / LL_TASK / f"{LL_TASK}.yaml").write_text(LL_YAML.format(parquet=parquet))
    (include / LL_TASK / "utils.py").write_text(TASK_UTILS)
    return include, parquet


def samples(output: Path, task: str) -> list[dict]:
    found = sorted(output.rglob(f"*_samples_{task}.jsonl"))
    assert len(found) == 1, list(output.rglob("*"))
    return sorted((json.loads(line) for line in found[0].read_text().splitlines()), key=lambda r: r["doc_id"])


def scores_of(record: dict) -> list[tuple[float, bool]]:
    """A multiple-choice sample's (log-probability, is_greedy) per choice, from lmms-eval's log (which
    writes them as strings, and leaves ``resps`` out where the filter changed nothing)."""
    out = []
    for choice in record["resps"] if "resps" in record else record["filtered_resps"]:
        while isinstance(choice[0], list):
            choice = choice[0]
        logprob, greedy = choice
        assert str(greedy) in ("True", "False"), choice
        out.append((float(logprob), str(greedy) == "True"))
    return out


def ll_score(record: dict) -> tuple[float, bool]:
    """A loglikelihood sample's (log-probability, is_greedy), from lmms-eval's log."""
    return scores_of({"resps": [record["resps"] if "resps" in record else record["filtered_resps"]]})[0]


@pytest.fixture(scope="module")
def one_process(mc_task, finished_run, tmp_path_factory) -> Path:
    include, _ = mc_task
    out = tmp_path_factory.mktemp("lmms-mc")
    result = lmms_eval(
        "--model",
        "m2pt",
        "--model_args",
        f"adapter={finished_run},batch_size=3",
        "--tasks",
        f"{TASK},{LL_TASK},{MME_TASK}",
        "--include_path",
        include,
        output=out,
    )
    assert results_file(out) is not None, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def lowest_wins() -> bool:
    """lmms-eval 0.7.3 picks a multiple-choice answer by ``np.argmin`` of the scores (its models return
    a loss); the m2pt model then hands it ``-log P`` per choice."""
    import inspect

    from lmms_eval.api.task import ConfigurableTask

    return "np.argmin(lls)" in inspect.getsource(ConfigurableTask.process_results)


def test_every_choice_scores_as_an_independent_forward(one_process, mc_task, finished_run):
    import datasets

    from m2pt_cli.model_source import load

    _, parquet = mc_task
    docs = datasets.load_dataset("parquet", data_files={"test": str(parquet)})["test"]
    records = samples(one_process, TASK)
    assert [r["doc_id"] for r in records] == list(range(len(docs))) and len(docs) == 18
    loaded = load(finished_run, device="cpu")
    sign = -1 if lowest_wins() else 1
    right = 0
    for record, doc in zip(records, docs, strict=True):
        image = doc["image"].convert("RGB")
        expected = [reference(loaded, image, doc["question"], f" {choice}") for choice in CHOICES]
        theirs = scores_of(record)
        assert [s for s, _ in theirs] == pytest.approx([sign * e[0] for e in expected], abs=1e-4), record["doc_id"]
        assert [g for _, g in theirs] == [e[1] for e in expected]
        best = max(range(len(CHOICES)), key=lambda k: expected[k][0])  # the likeliest choice
        right += CHOICES[best] == doc["answer"]
        assert record["acc"] == float(CHOICES[best] == doc["answer"])
    assert len({round(scores_of(r)[0][0], 4) for r in records}) > 1  # a live model: the scores differ
    assert 0 < right < len(docs)  # the accuracy can tell a wrong pick from a right one
    acc = json.loads(results_file(one_process).read_text())["results"][TASK]["acc,none"]
    assert acc == pytest.approx(right / len(docs))


def test_a_loglikelihood_task_gets_the_log_probability(one_process, mc_task, finished_run):
    """``output_type: loglikelihood`` (perplexity): the answer's log-probability as is."""
    import math

    import datasets

    from m2pt_cli.model_source import load

    _, parquet = mc_task
    docs = datasets.load_dataset("parquet", data_files={"test": str(parquet)})["test"]
    records = samples(one_process, LL_TASK)
    assert [r["doc_id"] for r in records] == list(range(len(docs)))
    loaded = load(finished_run, device="cpu")
    expected = [reference(loaded, d["image"].convert("RGB"), d["question"], " " + d["answer"]) for d in docs]
    theirs = [ll_score(r) for r in records]
    assert [s for s, _ in theirs] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert [g for _, g in theirs] == [e[1] for e in expected]
    result = json.loads(results_file(one_process).read_text())["results"][LL_TASK]
    assert result["perplexity,none"] == pytest.approx(math.exp(-sum(e[0] for e in expected) / len(docs)), rel=1e-4)
    assert result["acc,none"] == pytest.approx(sum(e[1] for e in expected) / len(docs))


def accelerate_lmms_eval(*args, output: Path, processes: int) -> subprocess.CompletedProcess:
    """lmms-eval under ``accelerate launch`` with ``processes`` CPU processes in one gloo group
    (``--multi_gpu`` makes accelerate start them through torchrun; with ``--cpu`` it starts one)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes also where there is a GPU
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lmms_eval",
        *map(str, args),
        "--output_path",
        str(output),
        "--log_samples",
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def test_two_processes_give_one_process_outputs_and_scores(one_process, mc_task, finished_run, tmp_path):
    include, _ = mc_task
    out = tmp_path / "two"
    result = accelerate_lmms_eval(
        "--model",
        "m2pt",
        "--model_args",
        f"adapter={finished_run},batch_size=3,device=cpu",
        "--tasks",
        f"{TASK},{LL_TASK},{MME_TASK}",
        "--include_path",
        include,
        output=out,
        processes=2,
    )
    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and results_file(out) is not None, log
    # two ranks shared the work: rank 0's progress bar (the only one shown) counts half the requests
    bars = re.findall(r"m2pt loglikelihood: 100%\S* (\d+)/(\d+)", result.stdout + result.stderr)
    assert bars and all(int(total) == 3 * 18 // 2 for _, total in bars), bars
    one, two = samples(one_process, TASK), samples(out, TASK)
    assert [r["doc_id"] for r in two] == [r["doc_id"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert [s for s, _ in scores_of(b)] == pytest.approx([s for s, _ in scores_of(a)], abs=1e-4)
        assert [g for _, g in scores_of(b)] == [g for _, g in scores_of(a)] and a["acc"] == b["acc"]
    one_mme, two_mme = samples(one_process, MME_TASK), samples(out, MME_TASK)
    assert [r["doc_id"] for r in two_mme] == [r["doc_id"] for r in one_mme] == list(range(18))
    assert [r["filtered_resps"] for r in two_mme] == [r["filtered_resps"] for r in one_mme]
    theirs, ours = (json.loads(results_file(o).read_text())["results"] for o in (one_process, out))
    two_ll = samples(out, LL_TASK)
    one_ll = samples(one_process, LL_TASK)
    assert [ll_score(r)[0] for r in two_ll] == pytest.approx([ll_score(r)[0] for r in one_ll], abs=1e-4)
    assert [ll_score(r)[1] for r in two_ll] == [ll_score(r)[1] for r in one_ll]
    # every score and its standard error, but perplexity's: lmms-eval bootstraps that one over the
    # gathered samples, whose order differs between one rank and two
    skip = {"alias", "perplexity_stderr,none"}
    for task in (TASK, LL_TASK, MME_TASK):
        assert {k: v for k, v in theirs[task].items() if k not in skip} == pytest.approx(
            {k: v for k, v in ours[task].items() if k not in skip}
        ), task
    assert ours[LL_TASK]["perplexity_stderr,none"] == pytest.approx(theirs[LL_TASK]["perplexity_stderr,none"], rel=0.05)
