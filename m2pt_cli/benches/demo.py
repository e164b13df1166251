"""The demo recipe's held-out digits: the same split the demo trains without."""

from __future__ import annotations

from collections.abc import Iterator

from m2pt_cli.benches.base import Bench, Sample


class Demo(Bench):
    """The 200 held-out samples of the bundled ``demo`` recipe (sklearn digits, seed 0)."""

    name = "demo"
    max_new_tokens = 4

    def samples(self, data: str | None, split: str | None, keep_wording: bool) -> Iterator[Sample]:
        from m2pt_cli import config
        from m2pt_cli.config import SourceCfg
        from m2pt_cli.data.sources import read_source
        from m2pt_cli.recipes import folder

        recipe = config.load(folder() / "demo.yaml")  # the bundled one, whatever the current folder holds
        records = read_source(SourceCfg(format="digits"), "demo")
        held_out = records.train_test_split(test_size=int(recipe.data.eval_size), seed=recipe.seed)["test"]
        for row in held_out:
            yield Sample(
                id=row["id"],
                image=row["image"],
                question=row["conversations"][0]["value"].replace("<image>\n", ""),
                answer=row["conversations"][1]["value"],
            )
