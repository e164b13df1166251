"""POPE (Li et al. 2023): object-hallucination yes/no questions in three splits."""

from __future__ import annotations

from typing import Any

from m2pt_cli.benches.base import SHORT_ANSWER, Bench, Sample, column

SPLITS = ("adversarial", "popular", "random")


def parse_pope(prediction: str) -> str:
    """LLaVA's POPE rule (``llava/eval/eval_pope.py``) on the stripped prediction, as LLaVA feeds it
    (``llava/eval/model_vqa_loader.py`` strips the decoded text): the text before the first ".",
    commas dropped, split on single spaces; a word "No", "not" or "no" (case-sensitive) means no,
    anything else yes (so "NO", "Not really", "yes\nno", "" and ".No" are all yes)."""
    words = prediction.strip().split(".")[0].replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def label(answer: Any) -> str:
    """The ground truth as LLaVA reads it: "no" is no, anything else yes (lmms-lab/POPE holds yes/no)."""
    return "no" if str(answer).strip().lower() == "no" else "yes"


class POPE(Bench):
    """POPE from lmms-lab/POPE (question_id, question, answer, image, category = split name)."""

    name = "pope"
    data = "lmms-lab/POPE"
    split = "test"
    max_new_tokens = 16
    rule = (
        "LLaVA llava/eval/eval_pope.py on the stripped prediction: text before the first '.', commas dropped, "
        "split on ' ', a word 'No', 'not' or 'no' -> no, else yes; accuracy, precision, recall, F1 of yes and "
        "yes-ratio of predictions, in percent, per split and overall"
    )

    def to_sample(self, row: dict[str, Any], index: int, keep_wording: bool) -> Sample:
        question = str(column(row, ("question",), self.name)).strip()
        return Sample(
            id=str(row.get("question_id", index)),
            image=row["image"],
            question=question if keep_wording else question + SHORT_ANSWER,
            answer=str(row["answer"]).strip().lower(),
            extra={"category": str(row.get("category", "all"))},
        )

    def restore_extra(self, row: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
        extra.setdefault("category", "all")  # as to_sample names a row without a split
        return extra

    def parse(self, prediction: str) -> str:
        return parse_pope(prediction)

    def correct(self, parsed: str, sample_answer: Any) -> float:
        return float(parsed == label(sample_answer))

    def check_answer(self, answer: Any) -> str | None:
        return None if isinstance(answer, str) and answer.strip().lower() in ("yes", "no") else "must be yes or no"

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Accuracy, precision, recall and F1 of 'yes', and the share of 'yes' predictions, per split and overall."""
        metrics: dict[str, float] = {}
        groups = {"": rows}
        for split in sorted({r["extra"]["category"] for r in rows}):
            groups[f"{split}_"] = [r for r in rows if r["extra"]["category"] == split]
        for prefix, group in groups.items():
            tp = sum(r["parsed"] == "yes" and label(r["answer"]) == "yes" for r in group)
            fp = sum(r["parsed"] == "yes" and label(r["answer"]) == "no" for r in group)
            fn = sum(r["parsed"] != "yes" and label(r["answer"]) == "yes" for r in group)
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            metrics[f"pope_{prefix}accuracy"] = 100.0 * sum(r["correct"] for r in group) / len(group)
            metrics[f"pope_{prefix}precision"] = 100.0 * precision
            metrics[f"pope_{prefix}recall"] = 100.0 * recall
            metrics[f"pope_{prefix}f1_score"] = 100.0 * (2 * precision * recall / (precision + recall) if tp else 0.0)
            metrics[f"pope_{prefix}yes_ratio"] = 100.0 * sum(r["parsed"] == "yes" for r in group) / len(group)
        return metrics
