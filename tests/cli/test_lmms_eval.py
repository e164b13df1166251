"""lmms-eval with ``--model m2pt``, offline, on a local MME-format task: every answer equals
``m2pt eval --bench mme``'s on the same data and adapter, the totals agree where the two harnesses'
parsers agree, and ``m2pt eval --predictions`` re-scores lmms-eval's ``--log_samples`` file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli.test_eval import write_mme_parquet
from tests.helpers import REPO, m2pt

pytestmark = pytest.mark.slow  # lmms-eval's own CLI in real processes

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[dev]' installs it)")

TASK = "mme_local"
MME_YAML = Path(sys.modules["lmms_eval"].__file__).parent / "tasks" / "mme" / "mme.yaml"


@pytest.fixture(scope="module")
def mme_task(tmp_path_factory) -> tuple[Path, Path]:
    """(include_path folder, parquet): lmms-eval's own MME task definition over a local parquet."""
    folder = tmp_path_factory.mktemp("lmms-tasks")
    parquet = write_mme_parquet(folder / "mme.parquet", images_per_category=3)
    # the task file is lmms-eval's own mme.yaml with the data set swapped for the local file
    task_dir = folder / TASK
    task_dir.mkdir()
    text = MME_YAML.read_text()
    text = text.replace("dataset_path: lmms-lab-encoder/MME", "dataset_path: parquet")
    text = text.replace("  token: True", f"  data_files:\n    test: {parquet}")
    text = text.replace('task: "mme"', f'task: "{TASK}"')
    assert f"test: {parquet}" in text and f'task: "{TASK}"' in text
    (task_dir / f"{TASK}.yaml").write_text(text)
    (task_dir / "utils.py").write_text("from lmms_eval.tasks.mme.utils import *  # noqa: F403\n")
    return folder, parquet


def lmms_eval(*args, output: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", *map(str, args), "--output_path", str(output), "--log_samples"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def samples_file(output: Path) -> Path:
    found = sorted(output.rglob(f"*_samples_{TASK}.jsonl"))
    assert len(found) == 1, list(output.rglob("*"))
    return found[0]


def results_file(output: Path) -> Path | None:
    found = sorted(output.rglob("*_results.json"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def both(mme_task, finished_run, tmp_path_factory):
    """lmms-eval's run and m2pt eval's, on the same adapter and data, batch 4 each."""
    include, parquet = mme_task
    out = tmp_path_factory.mktemp("lmms-out")
    result = lmms_eval(
        "--model",
        "m2pt",
        "--model_args",
        f"adapter={finished_run},batch_size=4",
        "--tasks",
        TASK,
        "--include_path",
        include,
        output=out,
    )
    assert results_file(out) is not None, result.stdout[-3000:] + result.stderr[-3000:]
    ours = tmp_path_factory.mktemp("m2pt-eval") / "mme"
    m2pt(
        "eval",
        "--bench",
        "mme",
        "--adapter",
        finished_run,
        "--data",
        parquet,
        "--batch-size",
        "4",
        "--output-dir",
        ours,
    )
    return out, ours


def test_every_answer_equals_m2pt_eval(both):
    out, ours = both
    theirs = sorted(
        (json.loads(line) for line in samples_file(out).read_text().splitlines()), key=lambda r: r["doc_id"]
    )
    mine = [json.loads(line) for line in (ours / "samples-mme.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in theirs] == list(range(len(mine))) and len(mine) == 18
    # the same prompt: lmms-eval's MME question (suffix replaced) is the question m2pt asks
    assert [r["input"] for r in theirs] == [r["prompt"].split("Answer the question")[0] for r in mine] or all(
        r["input"] in m["prompt"] for r, m in zip(theirs, mine, strict=True)
    )
    # the raw answer ("resps"; lmms-eval leaves it out when its filter changed nothing): lmms-eval cuts
    # an answer at its stop strings ("\n\n" by default), m2pt eval keeps the whole answer
    answers = [_text(r.get("resps", r["filtered_resps"])) for r in theirs]
    assert answers == [m["prediction"].split("\n\n", 1)[0] for m in mine]
    assert len(set(answers)) > 1  # a live model: the answers differ between questions
    # lmms-eval's MME filter strips the answer before scoring; m2pt's MME parser strips it too
    assert [_text(r["filtered_resps"]) for r in theirs] == [a.strip() for a in answers]


def _text(response) -> str:
    while isinstance(response, list) and len(response) == 1:
        response = response[0]
    return response


def test_totals_agree_where_the_parsers_agree(both):
    """lmms-eval's MME parser strips, deletes periods and reads a lone y/n; m2pt's (MME's own tool, as
    LLaVA feeds it) does not. Same answers: the totals are equal unless a record parses differently."""
    from lmms_eval.tasks.mme.utils import parse_pred_ans

    from m2pt_cli.benches.mme import MME

    out, ours = both
    theirs = json.loads(results_file(out).read_text())["results"][TASK]
    mine = json.loads((ours / "results.json").read_text())["metrics"]["mme"]
    rows = [json.loads(line) for line in (ours / "samples-mme.jsonl").read_text().splitlines()]
    differ = [
        (r["id"], r["prediction"])
        for r in rows
        if (parse_pred_ans(r["prediction"]) == r["answer"].lower())
        != (MME().parse(r["prediction"]) == r["answer"].lower())
    ]
    print("records the two parsers score differently:", differ)
    for key in ("mme_perception_score", "mme_cognition_score"):
        if not differ:
            assert theirs[f"{key},none"] == pytest.approx(mine[key]), key


def test_m2pt_rescoring_an_lmms_eval_samples_file_gives_m2pt_evals_scores(both, tmp_path):
    out, ours = both
    m2pt("eval", "--bench", "mme", "--predictions", samples_file(out), "--output-dir", tmp_path / "r")
    rescored = json.loads((tmp_path / "r" / "results.json").read_text())["metrics"]["mme"]
    mine = json.loads((ours / "results.json").read_text())["metrics"]["mme"]
    rows = [json.loads(line) for line in (ours / "samples-mme.jsonl").read_text().splitlines()]
    if all("\n\n" not in r["prediction"] for r in rows):  # else lmms-eval's answers were cut
        assert rescored == pytest.approx(mine)


BAD_MODEL_ARGS = [
    ("adapter={run},colour=red", "m2pt model_args: unknown colour (allowed: adapter, base, batch_size"),
    ("adapter={run}/nope", "m2pt model_args: adapter={run}/nope: no such folder"),
    ("adapter={run},base={other}", "m2pt model_args: model.name_or_path: {other} is a 'instructblip' checkpoint"),
    ("batch_size=2", "adapter=RUN_OR_ADAPTER is required"),
]


def test_bad_model_args_stop_the_run_with_one_line_and_no_results(mme_task, finished_run, tmp_path):
    """Through lmms-eval's own command line (a process each: one case; the others' messages below)."""
    include, _ = mme_task
    model_args, message = BAD_MODEL_ARGS[0]
    result = lmms_eval(
        "--model",
        "m2pt",
        "--model_args",
        model_args.format(run=finished_run),
        "--tasks",
        TASK,
        "--include_path",
        include,
        output=tmp_path / "out",
    )
    assert message in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    assert results_file(tmp_path / "out") is None and not list((tmp_path).rglob("*_samples_*.jsonl"))


@pytest.mark.parametrize(("model_args", "message"), BAD_MODEL_ARGS)
def test_bad_model_args_are_refused_naming_the_argument(finished_run, tiny_models, model_args, message):
    """What lmms-eval builds the model with (``create_from_arg_string``) refuses each bad argument."""
    from m2pt_cli.lmms_eval_model import M2PT

    other = tiny_models["instructblip"]
    with pytest.raises(ValueError) as refused:
        M2PT.create_from_arg_string(model_args.format(run=finished_run, other=other), {"device": "cpu"})
    assert message.format(run=finished_run, other=other) in str(refused.value)


def test_the_task_file_is_lmms_evals_own(mme_task):
    """The local task differs from lmms-eval's mme.yaml only in where the data comes from."""
    include, parquet = mme_task
    ours = yaml.safe_load((include / TASK / f"{TASK}.yaml").read_text().replace("!function", ""))
    theirs = yaml.safe_load(MME_YAML.read_text().replace("!function", ""))
    for key in ("dataset_path", "dataset_kwargs", "task"):
        ours.pop(key), theirs.pop(key)
    assert ours == theirs


def test_generate_until_stops_at_until_and_answers_as_a_full_decode_cut(finished_run):
    """The m2pt model in-process: a task's ``until`` ends decoding (fewer steps) and the answers equal
    a full decode (no ``until``) cut at the first stop string by hand."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from m2pt_cli.lmms_eval_model import M2PT

    model = M2PT(adapter=str(finished_run), batch_size=2, device="cpu")
    docs = [Image.new("RGB", (32, 32), (40 * k, 255 - 40 * k, 90)) for k in range(4)]
    model.task_dict = {"local": {"test": docs}}
    steps = [0]
    model.loaded.model.base.get_output_embeddings().register_forward_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))

    def ask(settings: dict) -> list[str]:
        requests = [
            Instance(
                "generate_until",
                (f"Question {k}?", settings, lambda doc: [doc], k, "local", "test"),
                k,
                {"task": "local", "doc_id": k, "repeats": 1},
            )
            for k in range(len(docs))
        ]
        steps[0] = 0
        return model.generate_until(requests)

    full = ask({"max_new_tokens": 24, "until": []})
    full_steps = steps[0]
    stop = max(full, key=len)[2:4]
    assert len(stop) == 2, full  # the tiny model rambles
    stopped = ask({"max_new_tokens": 24, "until": [stop]})
    assert stopped == [text.split(stop, 1)[0] for text in full]
    assert steps[0] < full_steps
