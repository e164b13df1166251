"""``m2pt chat``: a multi-turn conversation about one image in the terminal, answers streamed.

Lines are questions; ``/image FILE`` starts a new conversation about another image (the backbones
take one image per conversation), ``/reset`` clears the history, ``/quit`` or end of input (Ctrl-D)
leaves. Answers go to ``out`` (one line each); notes and errors to ``notes``. A line that cannot be
asked (not valid UTF-8, a prompt over the token limit, a bad ``/image``, an answer that fails) gets
one note and the session goes on.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from m2pt_cli.chat import conversation_prompt
from m2pt_cli.data.collate import open_image
from m2pt_cli.errors import UserError
from m2pt_cli.serving.budget import Budget, budget_of, prompt_tokens
from m2pt_cli.serving.engine import Answer, Engine, Job

HELP = "type a question; /image FILE: a new conversation about FILE, /reset: forget the history, Ctrl-D: quit"


def ask(
    engine: Engine,
    image: Any,
    turns: list[tuple[str, str]],
    question: str,
    max_new_tokens: int,
    budget: Budget | None = None,
) -> Iterator[str]:
    """The answer to ``question`` after ``turns`` about ``image``, as text deltas (through the engine,
    as the server answers); the last item is the whole answer as an ``Answer``.

    Raises:
        UserError: a prompt over ``budget`` (checked before it is queued), or generation failed.
    """
    loaded = engine.loaded
    try:
        if budget is not None:
            budget.check_chars(len(question) + sum(len(q) + len(a) for q, a in turns))
        prompt = conversation_prompt(loaded.processor, loaded.backbone, turns, question, loaded.template)
        if budget is not None:
            budget.check(prompt_tokens(loaded, prompt), max_new_tokens)
    except ValueError as exc:  # OverBudget, or text the tokenizer cannot take
        raise UserError(str(exc)) from None
    events: queue.Queue = queue.Queue()
    job = Job(image, prompt, turns[0][0] if turns else question, max_new_tokens, events.put)
    engine.submit(job)
    try:
        while True:
            kind, value = events.get()
            if kind == "error":
                raise UserError(value)
            yield value
            if kind == "done":
                return
    finally:
        engine.cancel(job)


def not_utf8(line: str) -> str:
    """Why an input line (decoded with ``surrogateescape``) is not valid UTF-8 text, or ''."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(line[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate {line[exc.start]!r}"
        return f"the line is not valid UTF-8 ({what} at character {exc.start})"
    return ""


def open_picture(path: str, max_pixels: int) -> Any:
    """An image file opened under the image policy (one line when it is refused)."""
    return open_image({"path": path}, path, max_pixels)


class Session:
    """The terminal conversation: its image, its history, and the commands that change them."""

    def __init__(
        self,
        engine: Engine,
        image_path: str | None,
        max_new_tokens: int,
        out: TextIO,
        notes: TextIO,
        max_prompt_tokens: int | None = None,
    ):
        self.engine, self.max_new_tokens, self.out, self.notes = engine, max_new_tokens, out, notes
        self.budget = budget_of(engine.loaded, max_prompt_tokens)
        self.max_pixels = engine.loaded.recipe.data.max_image_pixels
        self.image = open_picture(image_path, self.max_pixels) if image_path else None
        self.turns: list[tuple[str, str]] = []

    def note(self, text: str) -> None:
        print(f"m2pt: {text}", file=self.notes, flush=True)

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the user asked to leave. A line that cannot be
        acted on gets one note (``error: ...``) and the session goes on."""
        problem = not_utf8(line)
        if problem:
            self.note(f"error: {problem}; line skipped")
            return True
        try:
            return self._handle(line.strip())
        except UserError as exc:
            self.note(f"error: {exc}")
            return True

    def _handle(self, line: str) -> bool:
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/reset":
            self.turns = []
            self.note("history cleared")
        elif line.startswith("/image"):
            self._switch(line[len("/image") :].strip())
        elif line.startswith("/"):
            self.note(f"unknown command {line.split()[0]!r}; {HELP}")
        elif self.image is None:
            self.note("no image yet: /image FILE")
        else:
            self._answer(line)
        return True

    def _switch(self, path: str) -> None:
        if not path:
            self.note("/image needs a file: /image FILE")
            return
        try:
            self.image = open_picture(str(Path(path).expanduser()), self.max_pixels)
        except UserError as exc:
            self.note(f"error: {exc}")
            return
        self.turns = []
        self.note(f"new conversation about {path}")

    def _answer(self, question: str) -> None:
        started = False
        try:
            for item in ask(self.engine, self.image, self.turns, question, self.max_new_tokens, self.budget):
                started = True
                if isinstance(item, Answer):
                    print(file=self.out, flush=True)
                    self.turns.append((question, item.text))
                else:
                    print(item, end="", file=self.out, flush=True)
        except UserError:
            if started:  # end the half-written answer's line
                print(file=self.out, flush=True)
            raise

    def run(self, lines: Iterator[str]) -> None:
        """Handle ``lines`` until one asks to leave or they end."""
        for line in lines:
            if not self.handle(line):
                break
