"""Scorers on hand-built predictions, with totals worked out by hand."""

from __future__ import annotations

import pytest

from m2pt_cli.benches.base import normalize
from m2pt_cli.benches.mme import MME, parse_yes_no
from m2pt_cli.benches.pope import POPE, parse_pope
from m2pt_cli.benches.qa import QA
from m2pt_cli.benches.vqa_eval import normalize_vqa, vqa_accuracy
from m2pt_cli.evaluate import rescore


@pytest.mark.parametrize(
    "prediction, parsed",
    [
        ("Yes", "yes"),
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("yes, there is", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("There is no dog", "other"),
        ("maybe", "other"),
        ("", "other"),
        ("Not sure", "no"),
        ("  Yes", "yes"),  # stripped first, as LLaVA hands predictions to the tool
        ("\n\nYes", "yes"),
        ("\n no", "no"),
        ("a  no", "other"),  # only 4 characters are looked at: "a  n"
    ],
)
def test_mme_answer_parsing_follows_mmes_tool(prediction, parsed):
    assert parse_yes_no(prediction) == parsed


def mme_row(category, image, answer, prediction):
    return {
        "id": f"{category}/{image}-{answer}",
        "prediction": prediction,
        "answer": answer,
        "category": category,
        "question_id": f"{category}/{image}",
        "question": "Q?",
    }


def test_mme_scores_by_hand():
    rows = [
        # existence: img1 both right; img2 one right ("There is no dog" parses as other)
        mme_row("existence", "1.png", "Yes", "Yes."),
        mme_row("existence", "1.png", "No", "No"),
        mme_row("existence", "2.png", "Yes", "yes, there is"),
        mme_row("existence", "2.png", "No", "There is no dog"),
        # count: img3 both wrong; img4 one right
        mme_row("count", "3.png", "Yes", "no"),
        mme_row("count", "3.png", "No", "yes"),
        mme_row("count", "4.png", "No", "maybe"),
        mme_row("count", "4.png", "Yes", "YES"),
        # code_reasoning (cognition): both right
        mme_row("code_reasoning", "5.png", "Yes", "Yes"),
        mme_row("code_reasoning", "5.png", "No", "No."),
    ]
    bench = MME()
    scored = rescore(bench, rows)
    metrics = bench.aggregate(scored)
    assert metrics["mme_existence_acc"] == 75.0 and metrics["mme_existence_acc_plus"] == 50.0
    assert metrics["mme_existence_score"] == 125.0
    assert metrics["mme_count_acc"] == 25.0 and metrics["mme_count_acc_plus"] == 0.0
    assert metrics["mme_code_reasoning_score"] == 200.0
    assert metrics["mme_perception_score"] == 150.0
    assert metrics["mme_cognition_score"] == 200.0
    missing = bench.missing_subtasks(scored)
    assert len(missing) == 11 and "OCR" in missing and "existence" not in missing


@pytest.mark.parametrize(
    "prediction, parsed",
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a cat.", "no"),
        ("no, there isn't", "no"),
        # LLaVA's eval_pope: case-sensitive words 'No', 'not', 'no', split on single spaces, else yes
        ("NO", "yes"),
        ("Not really", "yes"),
        ("yes\nno", "yes"),
        (".No", "yes"),
        ("", "yes"),
        ("  No", "no"),
        ("Yes. But no cat.", "yes"),
    ],
)
def test_pope_parsing(prediction, parsed):
    assert parse_pope(prediction) == parsed


def test_pope_metrics_by_hand():
    cases = [
        ("yes", "Yes, there is a dog."),
        ("yes", "No."),
        ("no", "There is not a cat."),
        ("no", "Yes"),
        ("yes", "yes"),
        ("no", "no, there isn't"),
    ]
    rows = [
        {"id": str(i), "answer": a, "prediction": p, "extra": {"category": "random"}} for i, (a, p) in enumerate(cases)
    ]
    bench = POPE()
    metrics = bench.aggregate(rescore(bench, rows))
    # TP 2, FP 1, FN 1, TN 2
    assert metrics["pope_random_accuracy"] == pytest.approx(400 / 6)
    assert metrics["pope_random_precision"] == pytest.approx(200 / 3)
    assert metrics["pope_random_recall"] == pytest.approx(200 / 3)
    assert metrics["pope_random_f1_score"] == pytest.approx(200 / 3)
    assert metrics["pope_random_yes_ratio"] == 50.0
    assert metrics["pope_accuracy"] == metrics["pope_random_accuracy"]


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("Two.", "2"),
        ("The cat", "cat"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("hello-world", "hello world"),
        ("3.5", "3.5"),
        ("end.", "end"),
        ("  A\nRed  Car ", "red car"),
        ("none", "0"),
        ("3.", "3"),
        ("10:30.", "10:30"),
        ("red,white", "redwhite"),
        ("it's", "it 's"),
        ("whats", "what's"),
        ("shes", "shes"),
        ("oclock", "o'clock"),
    ],
)
def test_vqa_normalisation(text, normalized):
    assert normalize_vqa(text) == normalized


def test_vqa_accuracy_by_hand():
    # vqa_accuracy takes the prediction already through the processor (applied once, as the reference does)
    numbers = ["2", "2", "two", "2", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy(normalize_vqa("Two."), numbers) == 1.0
    assert vqa_accuracy(normalize_vqa("3"), numbers) == 1.0
    assert vqa_accuracy(normalize_vqa("4"), numbers) == 0.0
    # 2 of 10 say red: leaving out a red leaves 1 match (1/3), leaving out a blue leaves 2 (2/3)
    red = normalize_vqa("Red")
    assert vqa_accuracy(red, ["red"] * 2 + ["blue"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_classification_normalisation():
    assert normalize(" The Airplane. ") == "airplane"
    assert normalize("Cat!") == "cat"


def test_qa_metrics():
    bench = QA("contains")
    assert bench.correct(bench.parse("It is a red car."), "red car") == 1.0
    bench = QA("exact")
    assert bench.correct(bench.parse("Red car."), ["blue car", "red car"]) == 1.0
    assert bench.correct(bench.parse("It is a red car."), "red car") == 0.0


def test_a_configured_bench_is_a_new_instance_and_the_registered_one_stays():
    from m2pt_cli.benches import BENCHES
    from m2pt_cli.errors import UserError
    from m2pt_cli.evaluate import EvalSettings, get_bench

    registered = BENCHES.get("qa")
    vqa = get_bench("qa", EvalSettings(qa_metric="vqa"))
    assert vqa is not registered and vqa.metric == "vqa" and registered.metric == "exact"
    assert get_bench("qa", EvalSettings()).metric == "exact"
    with pytest.raises(UserError, match=r"--metric: 'contain' is not allowed; did you mean 'contains'\?"):
        get_bench("qa", EvalSettings(qa_metric="contain"))


def test_mme_owns_its_table_lines_and_summary():
    metrics = {"mme_OCR_acc": 50.0, "mme_OCR_score": 75.0, "mme_perception_score": 75.0, "mme_subtasks": 1.0}
    assert MME().headline(metrics) == {"mme_perception_score": 75.0, "mme_subtasks": 1.0}
    rows = [{"extra": {"category": "OCR"}}]
    subtasks = "existence count position color posters celebrity scene landmark artwork OCR commonsense_reasoning"
    subtasks += " numerical_calculation text_translation code_reasoning"
    assert MME().summary(rows) == {"missing_subtasks": [c for c in subtasks.split() if c != "OCR"]}


@pytest.mark.parametrize(
    "bench, row, message",
    [
        ("mme", {"prediction": "Y", "answer": "Yes", "category": "OCR"}, "line 1 of p.jsonl: no field 'question_id'"),
        ("mme", {"prediction": "Y", "answer": "Yes", "question_id": "x/1.png"}, "p.jsonl: no field 'category'"),
        ("mme", {"prediction": "Y", "answer": "Yes", "category": "x", "id": "a"}, "category 'x' is not an MME subtask"),
        (
            "mme",
            {"prediction": "Y", "answer": "Maybe", "category": "OCR", "id": "a"},
            "field 'answer' must be Yes or No",
        ),
        ("pope", {"prediction": "Yes", "answer": "maybe"}, "field 'answer' must be yes or no"),
        ("textvqa", {"prediction": "3", "answer": [3]}, "field 'answer' must be the human answers"),
        ("textvqa", {"prediction": None, "answer": "3"}, "field 'prediction' must be a string (got None)"),
        ("vsr", {"answer": "yes"}, "line 1 of p.jsonl: no field 'prediction' (a vsr row needs prediction, answer)"),
        ("qa", {"prediction": "x", "answer": "y", "extra": []}, "field 'extra' must be a JSON object"),
    ],
)
def test_rows_a_scorer_cannot_use_are_named(bench, row, message):
    from pathlib import Path

    from m2pt_cli.benches import BENCHES
    from m2pt_cli.errors import UserError

    with pytest.raises(UserError) as error:
        rescore(BENCHES.get(bench), [row], file=Path("p.jsonl"))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_results_name_the_rule_and_the_tool_format_keeps_fields(tmp_path):
    import json

    from m2pt_cli.evaluate import EvalSettings, rescore_file

    rows = [mme_row("OCR", "1.png", "Yes", "\n\tYes\nit\tis "), mme_row("OCR", "1.png", "No", "  no")]
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = rescore_file("mme", predictions, EvalSettings(), tmp_path / "out")
    assert results["benches"]["mme"]["scoring"].startswith("MME tool eval_tool/calculation.py")
    assert results["metrics"]["mme"]["mme_OCR_score"] == 200.0
    lines = (tmp_path / "out" / "mme_results" / "OCR.txt").read_text().splitlines()
    assert [line.split("\t")[3] for line in lines] == ["Yes it is", "no"]  # one field per line, stripped
