"""Stop strings end a row's decoding (``generate_answers(stop_strings=...)``, used by the lmms-eval
model for a task's ``until``): the answers, cut at the first stop string, equal a full decode cut
afterwards, and decoding takes fewer steps."""

from __future__ import annotations

import numpy as np
from PIL import Image

from m2pt_cli.model_source import load

MAX_NEW_TOKENS = 24


def _cut(text: str, stops: list[str]) -> str:
    """The reference: lmms-eval's ``until`` contract applied to a finished answer."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def _count_steps(loaded) -> list[int]:
    """A counter of the language model's output-layer calls (one per decoding step)."""
    calls = [0]
    loaded.model.base.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_stop_strings_give_the_cut_answers_in_fewer_steps(finished_run):
    loaded = load(finished_run, device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    questions = ["What digit is this?", "Describe the picture.", "Which number is shown?"]
    prompts = [loaded.prompt(question) for question in questions]
    steps = _count_steps(loaded)
    full = loaded.generate(images, prompts, questions, MAX_NEW_TOKENS)
    full_steps, steps[0] = steps[0], 0
    longest = max(full, key=len)
    assert len(longest) >= 8, full  # the model rambles: there is something to stop early
    # each row alone, with a stop string taken from the middle of its own full answer
    checked = 0
    for image, prompt, question, answer in zip(images, prompts, questions, full, strict=True):
        if len(answer) < 6:
            continue
        stops = [answer[3:5], "never-in-the-answer"]
        steps[0] = 0
        (stopped,) = loaded.generate([image], [prompt], [question], MAX_NEW_TOKENS, stop_strings=stops)
        assert _cut(stopped, stops) == _cut(answer, stops)
        assert stops[0] in stopped  # the row ran up to its stop string and no further than needed
        assert steps[0] < full_steps
        checked += 1
    assert checked >= 2, full
    # a batch: every row's cut answer is the full decode's, whichever row stops first
    stops = [longest[2:4]]
    batched = loaded.generate(images, prompts, questions, MAX_NEW_TOKENS, stop_strings=stops)
    assert [_cut(text, stops) for text in batched] == [_cut(text, stops) for text in full]


def test_no_stop_strings_change_nothing(finished_run):
    loaded = load(finished_run, device="cpu")
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    prompt = loaded.prompt("What is this?")
    plain = loaded.generate([image], [prompt], ["What is this?"], MAX_NEW_TOKENS)
    assert loaded.generate([image], [prompt], ["What is this?"], MAX_NEW_TOKENS, stop_strings=[]) == plain
