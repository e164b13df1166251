"""MME (Fu et al. 2023): 14 yes/no subtasks, two questions per image, scored as MME's own tool does."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m2pt_cli.benches.base import SHORT_ANSWER, Bench, Sample, column
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
    """MME's rule: lowercase; exactly yes/no, else yes/no within the first 4 characters, else other."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


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

    def write_extra(self, rows: list[dict[str, Any]], folder: Path) -> None:
        """MME's tool format: ``<subtask>.txt`` lines image, question, answer, prediction (tab-separated)."""
        out = folder / RESULTS_FOLDER
        lines: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            extra = row["extra"]
            check_category(extra.get("category"), f"sample {quote(row.get('id'))}")  # before anything is written
            image = extra["image_key"].split("/")[-1]
            prediction = " ".join(row["prediction"].split())
            lines[extra["category"]].append(f"{image}\t{extra['original_question']}\t{row['answer']}\t{prediction}")
        make_folder(out, root=folder)
        for category, entries in lines.items():
            write_text_atomic(out / f"{category}.txt", "\n".join(entries) + "\n", root=folder)
