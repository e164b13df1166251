"""Any question file (image, question, answer): exact match, contains, or VQA accuracy."""

from __future__ import annotations

from typing import Any

from m2pt_cli.benches.base import NORMALISATION, Bench, Sample, column, normalize
from m2pt_cli.benches.textvqa import TextVQA
from m2pt_cli.benches.vqa_eval import normalize_vqa, vqa_accuracy
from m2pt_cli.errors import UserError, did_you_mean

METRICS = ("exact", "contains", "vqa")


class QA(Bench):
    """A generic bench: ``--data`` with columns image, question, answer (a string or a list)."""

    name = "qa"
    split = "train"
    max_new_tokens = 32

    def __init__(self, metric: str = "exact") -> None:
        if metric not in METRICS:
            hint = did_you_mean(metric, METRICS)
            raise UserError(f"--metric: {metric!r} is not allowed{hint} (allowed: {', '.join(METRICS)})")
        self.metric = metric

    @classmethod
    def configured(cls, settings: Any) -> QA:
        return cls(settings.qa_metric)

    def to_sample(self, row: dict[str, Any], index: int, keep_wording: bool) -> Sample:
        return Sample(
            id=str(row.get("id", row.get("question_id", index))),
            image=column(row, ("image", "img"), self.name),
            question=str(column(row, ("question", "prompt"), self.name)),
            answer=column(row, ("answer", "answers"), self.name),
        )

    def parse(self, prediction: str) -> str:
        return normalize_vqa(prediction) if self.metric == "vqa" else normalize(prediction)

    def correct(self, parsed: str, sample_answer: Any) -> float:
        answers = sample_answer if isinstance(sample_answer, list) else [sample_answer]
        if self.metric == "vqa":
            return vqa_accuracy(parsed, [str(a) for a in answers])
        if self.metric == "contains":
            return float(any(normalize(str(a)) in parsed for a in answers))
        return float(any(parsed == normalize(str(a)) for a in answers))

    def check_answer(self, answer: Any) -> str | None:
        answers = answer if isinstance(answer, list) else [answer]
        if answers and all(super(QA, self).check_answer(a) is None for a in answers):
            return None
        return "must be a string or a list of strings"

    @property
    def rule(self) -> str:
        if self.metric == "vqa":
            return TextVQA.rule
        if self.metric == "contains":
            return f"contains: some normalised answer is a substring of the normalised prediction ({NORMALISATION})"
        return f"exact: the normalised prediction equals some normalised answer ({NORMALISATION})"

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {f"qa_{self.metric}": 100.0 * sum(r["correct"] for r in rows) / max(len(rows), 1)}
