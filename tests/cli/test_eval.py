"""``m2pt eval`` end to end on a tiny model and an MME-format parquet written here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from m2pt_cli.benches.mme import MME
from tests.helpers import REPO, m2pt

CATEGORIES = ("existence", "OCR", "code_reasoning")


def png(seed: int) -> bytes:
    image = Image.new("RGB", (40, 40), (seed * 40 % 255, 90, 200 - seed * 30 % 200))
    image.paste((255, 255, 255), (seed * 3 % 20, 5, seed * 3 % 20 + 12, 25))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mme_parquet(path, images_per_category: int = 2):
    """An MME-format parquet: per category, images with a Yes and a No question each."""
    import datasets

    rows = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for c, category in enumerate(CATEGORIES):
        for i in range(images_per_category):
            for answer in ("Yes", "No"):
                rows["question_id"].append(f"{category}/{i}.png")
                rows["image"].append({"bytes": png(c * images_per_category + i), "path": None})
                rows["question"].append(f"Is there a white box in image {i}? Please answer yes or no.")
                rows["answer"].append(answer)
                rows["category"].append(category)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "category": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def mme_parquet(tmp_path_factory):
    return write_mme_parquet(tmp_path_factory.mktemp("mme") / "mme.parquet")


@pytest.fixture(scope="module")
def full_eval(finished_run, mme_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "full"
    result = m2pt(
        "eval",
        "--bench",
        "mme",
        "--adapter",
        finished_run,
        "--data",
        mme_parquet,
        "--output-dir",
        out,
        "--batch-size",
        "5",
    )
    return out, result


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_json_and_jsonl_agree(full_eval):
    out, result = full_eval
    results = json.loads((out / "results.json").read_text())
    rows = jsonl(out / "samples-mme.jsonl")
    assert len(rows) == 12 == results["benches"]["mme"]["samples"]
    assert all(set(r) >= {"id", "prompt", "prediction", "parsed", "answer", "correct"} for r in rows)
    assert rows[0]["prompt"].endswith(
        "Is there a white box in image 0?\nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    recomputed = MME().aggregate(rows)
    assert results["metrics"]["mme"] == pytest.approx(recomputed)
    assert set(results["benches"]["mme"]["missing_subtasks"]) == set(MME().missing_subtasks(rows))
    assert results["model"]["adapter_sha256"] and results["model"]["recipe_sha256"]
    assert results["decoding"]["do_sample"] is False and results["benches"]["mme"]["max_new_tokens"] == 16
    assert "mme_perception_score" in result.stdout and "mme_cognition_score" in result.stdout


def test_mme_tool_format(full_eval):
    out, _ = full_eval
    lines = (out / "mme_results" / "existence.txt").read_text().splitlines()
    assert len(lines) == 4
    image, question, answer, prediction = lines[0].split("\t")
    assert image == "0.png" and question.endswith("Please answer yes or no.") and answer == "Yes"


def test_batching_does_not_change_predictions(full_eval, finished_run, mme_parquet, tmp_path):
    out, _ = full_eval
    m2pt(
        "eval",
        "--bench",
        "mme",
        "--adapter",
        finished_run,
        "--data",
        mme_parquet,
        "--output-dir",
        tmp_path,
        "--batch-size",
        "1",
        "--limit",
        "6",
    )
    single = [r["prediction"] for r in jsonl(tmp_path / "samples-mme.jsonl")]
    batched = [r["prediction"] for r in jsonl(out / "samples-mme.jsonl")][:6]
    assert single == batched
    assert json.loads((tmp_path / "results.json").read_text())["benches"]["mme"]["samples"] == 6


def test_resume_skips_samples_already_answered(full_eval, finished_run, mme_parquet, tmp_path):
    out, _ = full_eval
    lines = (out / "samples-mme.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines[:5]]
    for row in kept:
        row["prediction"] = "SENTINEL"
    torn = lines[5][: len(lines[5]) // 2]  # the interrupted write
    (tmp_path / "samples-mme.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + torn)
    m2pt(
        "eval", "--bench", "mme", "--adapter", finished_run, "--data", mme_parquet, "--output-dir", tmp_path, "--resume"
    )
    rows = jsonl(tmp_path / "samples-mme.jsonl")
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    assert [r["prediction"] for r in rows[:5]] == ["SENTINEL"] * 5
    original = {r["id"]: r["prediction"] for r in jsonl(out / "samples-mme.jsonl")}
    assert all(r["prediction"] == original[r["id"]] for r in rows[5:])


def torchrun(*args, port: int) -> subprocess.CompletedProcess:
    """``m2pt`` under torchrun with two CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "m2pt_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # torchrun: two processes
def test_two_processes_answer_every_sample_as_one_process_does(full_eval, finished_run, mme_parquet, tmp_path):
    """torchrun shares the samples between two processes; rank 0 merges and scores once: the same
    rows in the same order, the same predictions and scores as one process (batch 5 there, 3 here)."""
    out, _ = full_eval
    here = tmp_path / "dp"
    args = ("eval", "--bench", "mme", "--adapter", finished_run, "--data", mme_parquet, "--batch-size", "3")
    result = torchrun(*args, "--output-dir", here, port=29531)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = jsonl(out / "samples-mme.jsonl"), jsonl(here / "samples-mme.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in one]
    assert [r["prediction"] for r in two] == [r["prediction"] for r in one]
    results = json.loads((here / "results.json").read_text())
    assert results["metrics"] == json.loads((out / "results.json").read_text())["metrics"]
    assert results["processes"] == 2
    assert not list(here.glob("*.rank*.jsonl"))  # merged
    assert result.stdout.count("mme_perception_score") == 1  # rank 0 reports
    assert (here / "mme_results").is_dir()


@pytest.mark.slow  # torchrun: two processes
def test_a_resume_takes_the_answers_of_any_number_of_processes(full_eval, finished_run, mme_parquet, tmp_path):
    """Rank files left by an interrupted launch count as answered, whether the evaluation resumes
    with one process or two; what they hold is kept (SENTINEL) and only the rest is asked."""
    out, _ = full_eval
    rows = jsonl(out / "samples-mme.jsonl")
    args = ("eval", "--bench", "mme", "--adapter", finished_run, "--data", mme_parquet, "--resume")
    for processes in (1, 2):
        folder = tmp_path / f"resume-{processes}"
        folder.mkdir()
        for rank, part in enumerate((rows[0:6:2], rows[1:6:2])):  # samples 0-5, as two ranks share them
            kept = [{**r, "prediction": "SENTINEL"} for r in part]
            (folder / f"samples-mme.rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        if processes == 1:
            m2pt(*args, "--output-dir", folder)
        else:
            result = torchrun(*args, "--output-dir", folder, port=29532)
            assert result.returncode == 0, result.stderr[-3000:]
        merged = jsonl(folder / "samples-mme.jsonl")
        assert [r["id"] for r in merged] == [r["id"] for r in rows]
        assert [r["prediction"] for r in merged[:6]] == ["SENTINEL"] * 6
        assert [r["prediction"] for r in merged[6:]] == [r["prediction"] for r in rows[6:]]
        assert not list(folder.glob("*.rank*.jsonl"))


def test_a_launch_without_output_dir_is_refused(finished_run, tmp_path):
    result = torchrun("eval", "--bench", "demo", "--adapter", finished_run, "--limit", "2", port=29533)
    assert result.returncode != 0
    assert "multi-process launch: pass --output-dir" in result.stderr
    assert not list(finished_run.glob("eval-*"))


def test_rescoring_predictions_without_a_model(full_eval, tmp_path):
    out, _ = full_eval
    rows = jsonl(out / "samples-mme.jsonl")
    for row in rows:
        row["prediction"] = row["answer"] + "."  # a perfect tool, with punctuation
    (tmp_path / "perfect.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = m2pt("eval", "--bench", "mme", "--predictions", tmp_path / "perfect.jsonl", "--output-dir", tmp_path / "r")
    metrics = json.loads((tmp_path / "r" / "results.json").read_text())["metrics"]["mme"]
    assert metrics["mme_perception_score"] == 400.0 and metrics["mme_cognition_score"] == 200.0
    assert "400.00" in result.stdout


def test_mme_release_folder_layout(tmp_path):
    existence = tmp_path / "existence"
    (existence / "images").mkdir(parents=True)
    (existence / "questions_answers_YN").mkdir()
    Image.new("RGB", (8, 8)).save(existence / "images" / "a.jpg")
    (existence / "questions_answers_YN" / "a.txt").write_text(
        "Is it dark? Please answer yes or no.\tYes\nIs it bright? Please answer yes or no.\tNo\n"
    )
    code = tmp_path / "code_reasoning"
    code.mkdir()
    Image.new("RGB", (8, 8)).save(code / "0001.png")
    (code / "0001.txt").write_text("Does it print 3? Please answer yes or no.\tNo\nDoes it print 4?\tYes\n")
    samples = list(MME().samples(str(tmp_path), None, keep_wording=False))
    assert [s.extra["category"] for s in samples] == ["existence"] * 2 + ["code_reasoning"] * 2
    assert samples[0].question == "Is it dark?\nAnswer the question using a single word or phrase."
    assert samples[0].extra["image_key"] == "existence/a.jpg" and samples[3].answer == "Yes"
    kept = list(MME().samples(str(tmp_path), None, keep_wording=True))
    assert kept[0].question == "Is it dark? Please answer yes or no."


def test_demo_bench_matches_training_held_out_accuracy(tmp_path):
    """The demo bench is the demo recipe's held-out split: same 200 samples the trainer held out."""
    from m2pt_cli.benches import BENCHES

    samples = list(BENCHES.get("demo").samples(None, None, False))
    assert len(samples) == 200 and all(s.answer in "0123456789" for s in samples)
    assert len({s.id for s in samples}) == 200


def test_demo_bench_scores_each_wording_apart(tmp_path):
    """Per-wording accuracies: predictions right exactly on the first wording score 100 there, 0 elsewhere."""
    from m2pt_cli.benches import BENCHES
    from m2pt_cli.data.sources import DIGIT_QUESTIONS

    samples = list(BENCHES.get("demo").samples(None, None, False))
    asked = [DIGIT_QUESTIONS.index(s.question) for s in samples]
    assert sorted(set(asked)) == [0, 1, 2]
    rows = [
        {"id": s.id, "prediction": s.answer if q == 0 else "x", "answer": s.answer, "extra": {"wording": q}}
        for s, q in zip(samples, asked, strict=True)
    ]
    path = tmp_path / "samples-demo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m2pt("eval", "--bench", "demo", "--predictions", path, "--output-dir", tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]["demo"]
    assert metrics["demo_accuracy_q0"] == 100.0 and metrics["demo_accuracy_q1"] == metrics["demo_accuracy_q2"] == 0.0
    assert metrics["demo_accuracy"] == pytest.approx(100.0 * asked.count(0) / len(asked))


def test_unknown_bench_is_one_line(tmp_path):
    result = m2pt("eval", "--bench", "mmee", "--predictions", tmp_path / "x.jsonl", check=False)
    assert result.returncode == 2 and "unknown bench 'mmee'; did you mean 'mme'?" in result.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize("bad_line", [2, 5])
def test_a_bad_line_before_the_end_of_a_predictions_file_is_an_error(full_eval, tmp_path, bad_line):
    out, _ = full_eval
    lines = (out / "samples-mme.jsonl").read_text().splitlines()
    lines[bad_line - 1] = lines[bad_line - 1][:20]  # not JSON, and not the last line
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text("\n".join(lines) + "\n")
    result = m2pt("eval", "--bench", "mme", "--predictions", predictions, "--output-dir", tmp_path / "r", check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"{predictions}: line {bad_line} is not JSON" in result.stderr
    assert "only a torn last line may be" in result.stderr
    assert not (tmp_path / "r").exists()


def test_a_torn_last_line_of_a_predictions_file_is_dropped_and_said(full_eval, tmp_path):
    out, _ = full_eval
    lines = (out / "samples-mme.jsonl").read_text().splitlines()
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    result = m2pt("eval", "--bench", "mme", "--predictions", predictions, "--output-dir", tmp_path / "r")
    assert f"{predictions}: dropped line {len(lines)}, torn by an interrupted write" in result.stderr
    scored = json.loads((tmp_path / "r" / "results.json").read_text())["benches"]["mme"]["samples"]
    assert scored == len(lines) - 1
