"""MME (Fu et al. 2023): 14 yes/no subtasks, two questions per image, scored as MME's own tool does."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m2pt_cli.benches.base import SHORT_ANSWER, Bench, Sample, column
from m2pt_cli.data.images import LEAVES_FOLDER, in_folder
from m2pt_cli.errors import UserError, quote
from m2pt_cli.files import make_folder, write_text_atomic

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
ORIGINAL_SUFFIX = " Please answer yes or no."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESULTS_FOLDER = "mme_results"  # MME's tool format: <subtask>.txt files


def check_category(category: Any, where: str) -> str:
    """``category`` when it is an MME subtask; it names a file of the tool format, so anything else
    (``../x``, a typo) is a one-line error naming ``where`` (the sample or line it came from)."""
    if category not in PERCEPTION + COGNITION:
        raise UserError(
            f"{where}: category {quote(category)} is not an MME subtask (allowed: {', '.join(PERCEPTION + COGNITION)})"
        )
    return category


def parse_yes_no(prediction: str) -> str:
    """MME's tool (``eval_tool/calculation.py``, ``parse_pred_ans``) on the stripped prediction, as
    LLaVA feeds it (``llava/eval/model_vqa_loader.py`` strips the decoded text): lowercase; exactly
    yes/no, else "yes" and then "no" searched within the first 4 characters, else other."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def tool_field(prediction: str) -> str:
    """The prediction as a field of the tool's tab-separated lines: stripped, and each tab or line
    break made one space. The tool then reaches the label ``parse_yes_no`` gives: it sees the same
    characters at the same places (one whitespace for another, and "yes" and "no" hold none)."""
    return prediction.strip().replace("\t", " ").replace("\r", " ").replace("\n", " ")


class MME(Bench):
    """MME from lmms-lab/MME (question_id, image, question, answer, category), local parquet/arrow/json
    with the same columns, or the original MME_Benchmark_release_version folder.

    The question's " Please answer yes or no." is replaced by the short-answer suffix, as LLaVA and
    lmms-eval do; ``keep_wording`` keeps the original question.
    """

    name = "mme"
    data = "lmms-lab/MME"
    split = "test"
    max_new_tokens = 16
    rule = (
        "MME tool eval_tool/calculation.py (BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch) "
        "on the stripped prediction as LLaVA feeds it: lowercase; yes/no exactly, else yes then no within the "
        "first 4 characters, else other; per subtask acc + acc+ in percent, perception and cognition sums"
    )

    def samples(self, data: str | None, split: str | None, keep_wording: bool) -> Iterator[Sample]:
        if data and Path(data).is_dir() and any((Path(data) / c).is_dir() for c in PERCEPTION + COGNITION):
            yield from self._release_folder(Path(data), keep_wording)
            return
        yield from super().samples(data, split, keep_wording)

    def to_sample(self, row: dict[str, Any], index: int, keep_wording: bool) -> Sample:
        question = str(column(row, ("question",), self.name)).strip()
        image_key = str(column(row, ("question_id", "image_id"), self.name))
        check_category(row.get("category"), f"bench mme: sample {image_key}#{index}")
        return Sample(
            id=f"{image_key}#{index}",
            image=row["image"],
            question=question if keep_wording else question.replace(ORIGINAL_SUFFIX, "") + SHORT_ANSWER,
            answer=str(row["answer"]).strip(),
            extra={"category": row["category"], "image_key": image_key, "original_question": question},
        )

    def _release_folder(self, root: Path, keep_wording: bool) -> Iterator[Sample]:
        """MME_Benchmark_release_version: per subtask, images + questions_answers_YN/*.txt, or both side by side."""
        index = 0
        for category in PERCEPTION + COGNITION:
            folder = root / category
            if not folder.is_dir():
                continue
            qa_dir = folder / "questions_answers_YN"
            image_dir = folder / "images" if qa_dir.is_dir() else folder
            for txt in sorted((qa_dir if qa_dir.is_dir() else folder).glob("*.txt")):
                image = next(
                    (image_dir / (txt.stem + s) for s in IMAGE_SUFFIXES if (image_dir / (txt.stem + s)).exists()), None
                )
                if image is None:
                    raise UserError(f"{txt}: no image {txt.stem}.png/.jpg in {image_dir}")
                if in_folder(str(image.relative_to(root)), (root,)) is None:  # a link out of the folder
                    raise UserError(f"{txt}: image {quote(str(image))}: {LEAVES_FOLDER}")
                for line in txt.read_text().splitlines():
                    if not line.strip():
                        continue
                    question, answer = line.rsplit("\t", 1)
                    row = {
                        "question_id": f"{category}/{image.name}",
                        "image": {"bytes": None, "path": str(image)},
                        "question": question,
                        "answer": answer,
                        "category": category,
                    }
                    yield self.to_sample(row, index, keep_wording)
                    index += 1

    def parse(self, prediction: str) -> str:
        return parse_yes_no(prediction)

    def correct(self, parsed: str, sample_answer: Any) -> float:
        return float(parsed == str(sample_answer).lower())

    def check_answer(self, answer: Any) -> str | None:
        return None if isinstance(answer, str) and answer.lower() in ("yes", "no") else "must be Yes or No"

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Per subtask acc, acc+ (both questions of an image right) and score = acc + acc+ (percent)."""
        by_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            by_image[row["extra"]["category"]][row["extra"]["image_key"]].append(row["correct"])
        metrics: dict[str, float] = {}
        for category, images in by_image.items():
            answers = [c for scores in images.values() for c in scores]
            acc = 100.0 * sum(answers) / len(answers)
            acc_plus = 100.0 * sum(all(scores) for scores in images.values()) / len(images)
            metrics[f"mme_{category}_acc"] = acc
            metrics[f"mme_{category}_acc_plus"] = acc_plus
            metrics[f"mme_{category}_score"] = acc + acc_plus
        metrics["mme_perception_score"] = sum(metrics.get(f"mme_{c}_score", 0.0) for c in PERCEPTION)
        metrics["mme_cognition_score"] = sum(metrics.get(f"mme_{c}_score", 0.0) for c in COGNITION)
        metrics["mme_subtasks"] = float(len(by_image))
        return metrics

    def missing_subtasks(self, rows: list[dict[str, Any]]) -> list[str]:
        present = {r["extra"]["category"] for r in rows}
        return [c for c in PERCEPTION + COGNITION if c not in present]

    row_fields = ("prediction", "answer", "category", "question_id")

    def check_extra(self, extra: dict[str, Any], where: str) -> None:
        check_category(extra.get("category"), where)  # it names a file of the tool format

    def restore_extra(self, row: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
        needs = ", ".join(self.row_fields)
        if extra.get("category") is None:
            raise UserError(f"{where}: no field 'category' (the MME subtask; an mme row needs {needs})")
        self.check_extra(extra, where)
        if "image_key" not in extra and row.get("question_id", row.get("id")) is None:
            raise UserError(f"{where}: no field 'question_id' (the image key; an mme row needs {needs})")
        extra.setdefault("image_key", str(row.get("question_id", row.get("id"))))
        extra.setdefault("original_question", row.get("question", row.get("prompt", "")))
        return extra

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"missing_subtasks": self.missing_subtasks(rows)}

    def headline(self, metrics: dict[str, float]) -> dict[str, float]:
        """The perception and cognition totals and the subtask count; per-subtask lines stay in results.json."""
        per_subtask = tuple(f"mme_{category}_" for category in PERCEPTION + COGNITION)
        return {key: value for key, value in metrics.items() if not key.startswith(per_subtask)}

    def write_extra(self, rows: list[dict[str, Any]], folder: Path) -> None:
        """MME's tool format: ``<subtask>.txt`` lines image, question, answer, prediction (tab-separated).

        The tool takes each two consecutive lines as one image (acc+), so an image's lines are kept
        together, images in order of first appearance."""
        out = folder / RESULTS_FOLDER
        images: dict[str, dict[str, list[str]]] = defaultdict(dict)
        for row in rows:
            extra = row["extra"]
            check_category(extra.get("category"), f"sample {quote(row.get('id'))}")  # before anything is written
            image = extra["image_key"].split("/")[-1]
            line = f"{image}\t{extra['original_question']}\t{row['answer']}\t{tool_field(row['prediction'])}"
            images[extra["category"]].setdefault(extra["image_key"], []).append(line)
        lines = {category: [line for group in groups.values() for line in group] for category, groups in images.items()}
        make_folder(out, root=folder)
        for category, entries in lines.items():
            write_text_atomic(out / f"{category}.txt", "\n".join(entries) + "\n", root=folder)
