"""The digits source asks the chosen question wordings in turn, over the same images in the same
order, so a held-out split holds the same images whatever the wording (instruction generalisation:
train on some wordings, evaluate on one never seen)."""

from __future__ import annotations

import pytest

from m2pt_cli.config import SourceCfg
from m2pt_cli.data.sources import DIGIT_QUESTIONS, read_source


def questions(rows) -> list[str]:
    return [row["conversations"][0]["value"].removeprefix("<image>\n") for row in rows]


@pytest.fixture(scope="module")
def every_wording():
    return read_source(SourceCfg(format="digits"), "d")


@pytest.mark.parametrize("chosen", [[0, 1], [2], [1, 0]])
def test_the_chosen_wordings_in_turn_over_the_same_images(every_wording, chosen):
    rows = read_source(SourceCfg(format="digits", questions=chosen), "d")
    assert questions(rows) == [DIGIT_QUESTIONS[chosen[i % len(chosen)]] for i in range(len(rows))]
    assert rows["id"] == every_wording["id"]
    assert [r["image"]["bytes"] for r in rows] == [r["image"]["bytes"] for r in every_wording]
    assert [r["conversations"][1] for r in rows] == [r["conversations"][1] for r in every_wording]


def test_no_choice_is_every_wording_in_turn(every_wording):
    assert questions(every_wording)[:6] == list(DIGIT_QUESTIONS) * 2


def test_a_held_out_split_is_the_same_images_whatever_the_wording(every_wording):
    seen = read_source(SourceCfg(format="digits", questions=[0, 1]), "d")
    unseen = read_source(SourceCfg(format="digits", questions=[2]), "d")
    split = [part.train_test_split(test_size=200, seed=0)["test"]["id"] for part in (seen, unseen, every_wording)]
    assert split[0] == split[1] == split[2]
    assert set(questions(unseen)) == {DIGIT_QUESTIONS[2]} and DIGIT_QUESTIONS[2] not in questions(seen)
