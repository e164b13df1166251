"""What a bench is: where its data comes from, how it asks, how it parses and scores answers."""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2pt_cli.errors import UserError, first_line, quote

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5 / lmms-eval suffix


@dataclass
class Sample:
    """One question. ``image`` is a PIL image or a ``{bytes, path}`` reference; ``answer`` may be a list."""

    id: str
    image: Any
    question: str
    answer: Any
    extra: dict[str, Any] = field(default_factory=dict)


# The M²PT paper's own scorer for VSR, SNLI-VE, CIFAR and MNIST is not published (the official
# repository's scripts/bash_eval.sh runs twdebug/llm_eval_score.py, which it does not ship), so the
# label benches follow the project's definition (docs/method.md: accuracy of the normalised answer against
# the label), spelled out here and in docs/evaluation.md.
NORMALISATION = (
    "lowercase, trim, ASCII punctuation and spaces removed at both ends, the words a/an/the removed "
    "(regex \\b(a|an|the)\\b), whitespace collapsed"
)
LABEL_RULE = (
    f"label accuracy: the normalised answer equals the normalised label ({NORMALISATION}); the project's "
    "definition in docs/method.md, as the M2PT paper's own scorer is unpublished"
)


def normalize(text: str) -> str:
    """Lowercase, trim, drop punctuation at the ends and the articles a/an/the."""
    text = text.strip().lower().strip(string.punctuation + " ")
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


class Bench:
    """Base class: subclasses set the class attributes and override what differs.

    Attributes:
        name: registry name.
        data: default hub dataset id; ``split``: its default split.
        max_new_tokens: default generation budget.
        rule: the scoring rule and the reference it follows (results.json names it).
    """

    name = ""
    data = ""
    split = "test"
    max_new_tokens = 16
    rule = LABEL_RULE

    def samples(self, data: str | None, split: str | None, keep_wording: bool) -> Iterator[Sample]:
        """Samples in a fixed order (the data's own)."""
        rows = load_rows(data or self.data, split or self.split, self.name)
        for index, row in enumerate(rows):
            yield at_row(data or self.data, index, self.to_sample, row, index, keep_wording)

    def to_sample(self, row: dict[str, Any], index: int, keep_wording: bool) -> Sample:
        raise NotImplementedError

    def parse(self, prediction: str) -> str:
        """The answer read from a generation."""
        return normalize(prediction)

    def correct(self, parsed: str, sample_answer: Any) -> float:
        """1.0 when right (VQA accuracy may give fractions)."""
        return float(parsed == normalize(str(sample_answer)))

    def check_answer(self, answer: Any) -> str | None:
        """Why ``answer`` (from a predictions file) cannot be scored; None when it can."""
        return None if isinstance(answer, (str, int, float)) and not isinstance(answer, bool) else "must be a string"

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics from per-sample rows (``correct``, ``parsed``, ``answer``, ``extra``)."""
        return {f"{self.metric_prefix}_accuracy": 100.0 * sum(r["correct"] for r in rows) / max(len(rows), 1)}

    @property
    def metric_prefix(self) -> str:
        return self.name.replace("-", "_")

    def write_extra(self, rows: list[dict[str, Any]], folder: Path) -> None:
        """Bench-specific files beside the results (e.g. MME's tool format)."""

    # What a bench needs beyond the common path; the evaluator never asks a bench's name.
    row_fields: tuple[str, ...] = ("prediction", "answer")  # what a predictions-file row must hold

    @classmethod
    def configured(cls, settings: Any) -> Bench:
        """A new instance for one evaluation's ``settings`` (``EvalSettings``); the registered one
        is never changed."""
        return cls()

    def check_extra(self, extra: dict[str, Any], where: str) -> None:
        """Refuse a row's ``extra`` this bench cannot use (``where`` names the row in the error)."""

    def restore_extra(self, row: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
        """``extra`` of a row read back from a predictions file, completed from the row's own fields."""
        self.check_extra(extra, where)
        return extra

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Entries of the bench's results beside its metrics (MME: the subtasks it lacks)."""
        return {}

    def headline(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics ``m2pt eval`` prints (results.json keeps them all)."""
        return metrics


def load_rows(data: str, split: str, bench: str):
    """The bench's rows (``data.rows.Rows``: a hub id, a data file, a glob or a folder; a JSON file
    streamed), each image path held to the data's image folder."""
    from m2pt_cli.data.rows import bench_rows

    try:
        return bench_rows(data, split)
    except (FileNotFoundError, ValueError, OSError, IndexError, RuntimeError, StopIteration) as exc:
        # RuntimeError: a loading script; StopIteration: datasets on an empty file
        raise UserError(f"--data: cannot load {data!r} for bench {bench} ({first_line(exc)})") from None


def at_row(data: str, index: int, make: Callable[..., Sample], *args: Any) -> Sample:
    """``make(*args)``, its one-line error prefixed with the data and the row it came from."""
    try:
        return make(*args)
    except UserError as exc:
        raise UserError(f"--data {data}: row {index + 1}: {exc}") from None


def column(row: dict[str, Any], names: tuple[str, ...], bench: str) -> Any:
    """The first of ``names`` present in ``row``."""
    for name in names:
        if name in row:
            return row[name]
    raise UserError(f"bench {bench}: the data has none of the columns {', '.join(names)} (has {quote(list(row))})")
