"""TextVQA (Singh et al. 2019): reading text in images, scored with VQA accuracy."""

from __future__ import annotations

from typing import Any

from m2pt_cli.benches.base import SHORT_ANSWER, Bench, Sample, column
from m2pt_cli.benches.vqa_eval import normalize_vqa, vqa_accuracy


class TextVQA(Bench):
    """TextVQA from lmms-lab/textvqa (question_id, question, image, answers: ten human answers)."""

    name = "textvqa"
    data = "lmms-lab/textvqa"
    split = "validation"
    max_new_tokens = 16
    rule = (
        "VQA accuracy: EvalAIAnswerProcessor applied once to the prediction and to each human answer, "
        "mean over leave-one-out subsets of min(matches / 3, 1) (LLaVA llava/eval/m4c_evaluator.py "
        "TextVQAAccuracyEvaluator; lmms-eval lmms_eval/tasks/_task_utils/vqa_eval_metric.py)"
    )

    def to_sample(self, row: dict[str, Any], index: int, keep_wording: bool) -> Sample:
        question = str(column(row, ("question",), self.name)).strip()
        answers = column(row, ("answers", "answer"), self.name)
        return Sample(
            id=str(row.get("question_id", index)),
            image=row["image"],
            question=question if keep_wording else question + SHORT_ANSWER,
            answer=list(answers) if isinstance(answers, list) else [str(answers)],
        )

    def parse(self, prediction: str) -> str:
        return normalize_vqa(prediction)

    def correct(self, parsed: str, sample_answer: Any) -> float:
        answers = sample_answer if isinstance(sample_answer, list) else [sample_answer]
        return vqa_accuracy(parsed, [str(a) for a in answers])

    def check_answer(self, answer: Any) -> str | None:
        if isinstance(answer, str) or (isinstance(answer, list) and all(isinstance(a, str) for a in answer)):
            return None
        return "must be the human answers: a list of strings (or one string)"

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {"textvqa_accuracy": 100.0 * sum(r["correct"] for r in rows) / max(len(rows), 1)}
