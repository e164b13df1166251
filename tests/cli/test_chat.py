"""``m2pt chat`` through piped stdin: multi-turn answers conditioned on the history, ``/reset``,
``/image`` and end of input; the first answer is ``m2pt generate``'s."""

from __future__ import annotations

import pytest

from tests.helpers import m2pt

pytestmark = pytest.mark.slow  # the demo adapter, trained for 40 steps first

FOLLOW_UPS = ["What digit is it?", "And now?", "Are you sure?", "What is it plus one?", "Say it again."]


@pytest.fixture(scope="module")
def loaded(demo_adapter):
    from m2pt_cli.model_source import load

    return load(demo_adapter / "adapter")


def answer(loaded, image_path, turns, question) -> str:
    """The in-process answer to ``question`` after ``turns`` (the multi-turn prompt, one batch of 1)."""
    from m2pt_cli.chat import conversation_prompt
    from m2pt_cli.data.collate import open_image

    image = open_image({"path": str(image_path)}, str(image_path))
    prompt = conversation_prompt(loaded.processor, loaded.backbone, turns, question, loaded.template)
    first = turns[0][0] if turns else question
    return loaded.generate([image], [prompt], [first], 64)[0].strip()


def test_two_turns_the_second_conditioned_on_the_first(demo_adapter, demo_images, loaded):
    """Proves: turn 1 prints ``m2pt generate``'s answer; turn 2 prints the answer to the two-turn
    prompt (which holds turn 1's question and answer), and for the follow-up chosen that answer
    differs from the one the same question gets asked fresh, so chat did use the history.
    ``/reset`` then asks afresh, ``/image`` starts over with another image, EOF ends with exit 0."""
    from m2pt_cli.chat import conversation_prompt

    (image, question), (other, other_question) = demo_images[0], demo_images[3]
    first = m2pt("generate", "--adapter", demo_adapter, "--image", image, "--prompt", question, "--device", "cpu")
    first = first.stdout.strip()
    follow_up = next(
        (q for q in FOLLOW_UPS if answer(loaded, image, [(question, first)], q) != answer(loaded, image, [], q)), None
    )
    assert follow_up is not None, "no follow-up whose answer depends on the history: the test proves nothing"
    prompt = conversation_prompt(loaded.processor, loaded.backbone, [(question, first)], follow_up, loaded.template)
    assert question in prompt and f"{first}{loaded.end_of_turn}" in prompt and prompt.rstrip().endswith("ASSISTANT:")

    script = f"{question}\n{follow_up}\n/reset\n{follow_up}\n/image {other}\n{other_question}\n"
    result = m2pt("chat", demo_adapter, "--image", image, "--device", "cpu", input=script)
    assert result.stdout.split("\n") == [
        first,
        answer(loaded, image, [(question, first)], follow_up),
        answer(loaded, image, [], follow_up),
        answer(loaded, other, [], other_question),
        "",
    ]
    assert "history cleared" in result.stderr and f"new conversation about {other}" in result.stderr


def test_commands_that_are_not_questions_are_noted_and_the_chat_goes_on(demo_adapter, demo_images, tmp_path):
    image, question = demo_images[0]
    (tmp_path / "notes.txt").write_text("not an image")
    script = f"/image {tmp_path / 'notes.txt'}\n/image\n/frobnicate\n\n{question}\n/quit\n{question}\n"
    result = m2pt("chat", demo_adapter, "--image", image, "--device", "cpu", input=script)
    assert len(result.stdout.splitlines()) == 1  # one answer: /quit left before the second question
    assert "cannot read its image" in result.stderr
    assert "/image needs a file" in result.stderr and "unknown command '/frobnicate'" in result.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("{tmp}",), "no m2pt adapter here"),
        (("{adapter}", "--image", "{tmp}/notes.txt"), "cannot read its image"),
    ],
    ids=["not an adapter", "not an image"],
)
def test_chat_bad_input_is_one_line_exit_2(demo_adapter, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not an image")
    argv = [a.format(tmp=tmp_path, adapter=demo_adapter) for a in args]
    result = m2pt("chat", *argv, "--device", "cpu", check=False, input="")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_a_line_it_cannot_use_gets_one_note_and_the_chat_goes_on_to_eof(demo_adapter, demo_images, loaded, tmp_path):
    """Piped bytes (read from ``sys.stdin.buffer``, as from a real pipe): a line of invalid UTF-8,
    a line of 100,000 characters (refused from its length), one over the 128-token prompt limit, a
    bad /image; each gets one note, the question after them gets ``m2pt generate``'s answer, and the
    end of input ends the chat with exit 0."""
    image, question = demo_images[0]
    script = b"".join(
        [
            b"What \xff\xfe digit?\n",
            b"7" * 100_000 + b"\n",
            b"7" * 300 + b"\n",
            f"/image {tmp_path / 'missing.png'}\n".encode(),
            f"{question}\n".encode(),
        ]
    )
    result = m2pt("chat", demo_adapter, "--image", image, "--device", "cpu", input=script)
    notes = result.stderr.splitlines()
    assert result.returncode == 0, notes
    assert result.stdout.split("\n") == [answer(loaded, image, [], question), ""]
    errors = [line for line in notes if line.startswith("m2pt: error:")]
    assert len(errors) == 4, notes
    assert "not valid UTF-8 (byte 0xff at character 5); line skipped" in errors[0]
    assert "100000 characters, more than a prompt of at most 128 tokens" in errors[1]
    assert "tokens (chat template and image tokens included), over the limit of 128" in errors[2]
    assert "image file missing" in errors[3]
