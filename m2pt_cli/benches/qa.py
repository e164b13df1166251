"""Any question file (image, question, answer): exact match, contains, or VQA accuracy."""

from __future__ import annotations

from typing import Any

from m2pt_cli.benches.base import Bench, Sample, column, normalize
from m2pt_cli.benches.vqa_eval import normalize_vqa, vqa_accuracy

METRICS = ("exact", "contains", "vqa")


class QA(Bench):
    """A generic bench: ``--data`` with columns image, question, answer (a string or a list)."""

    name = "qa"
    split = "train"
    max_new_tokens = 32
    metric = "exact"

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

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {f"qa_{self.metric}": 100.0 * sum(r["correct"] for r in rows) / max(len(rows), 1)}
