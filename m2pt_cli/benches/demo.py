"""The demo recipe's held-out digits: the same split the demo trains without."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from m2pt_cli.benches.base import Bench, Sample


class Demo(Bench):
    """The 200 held-out samples of the bundled ``demo`` recipe (sklearn digits, seed 0), asked in the
    three digit wordings in turn; accuracy overall and per wording (``demo_accuracy_q0`` .. ``_q2``, the
    index into the ``questions`` a digits source takes), so a run trained on some wordings shows how it
    answers the others."""

    name = "demo"
    max_new_tokens = 4

    def samples(self, data: str | None, split: str | None, keep_wording: bool) -> Iterator[Sample]:
        from m2pt_cli import config
        from m2pt_cli.config import SourceCfg
        from m2pt_cli.data.sources import DIGIT_QUESTIONS, read_source
        from m2pt_cli.recipes import folder

        recipe = config.load(folder() / "demo.yaml")  # the bundled one, whatever the current folder holds
        records = read_source(SourceCfg(format="digits"), "demo")
        held_out = records.train_test_split(test_size=int(recipe.data.eval_size), seed=recipe.seed)["test"]
        for row in held_out:
            question = row["conversations"][0]["value"].replace("<image>\n", "")
            yield Sample(
                id=row["id"],
                image=row["image"],
                question=question,
                answer=row["conversations"][1]["value"],
                extra={"wording": DIGIT_QUESTIONS.index(question)},
            )

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Accuracy over all rows, then over the rows of each wording (rows that name one)."""
        metrics = super().aggregate(rows)
        wordings = sorted({r["extra"]["wording"] for r in rows if isinstance(r["extra"].get("wording"), int)})
        for wording in wordings:
            group = [r for r in rows if r["extra"].get("wording") == wording]
            metrics[f"demo_accuracy_q{wording}"] = 100.0 * sum(r["correct"] for r in group) / len(group)
        return metrics
