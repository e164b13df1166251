"""``m2pt chat``: a multi-turn conversation about one image in the terminal, answers streamed.

Lines are questions; ``/image FILE`` starts a new conversation about another image (the backbones
take one image per conversation), ``/reset`` clears the history, ``/quit`` or end of input (Ctrl-D)
leaves. Answers go to ``out`` (one line each); notes and errors to ``notes``.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from m2pt_cli.chat import conversation_prompt
from m2pt_cli.data.collate import open_image
from m2pt_cli.errors import UserError
from m2pt_cli.serving.engine import Answer, Engine, Job

HELP = "type a question; /image FILE: a new conversation about FILE, /reset: forget the history, Ctrl-D: quit"


def ask(engine: Engine, image: Any, turns: list[tuple[str, str]], question: str, max_new_tokens: int) -> Iterator[str]:
    """The answer to ``question`` after ``turns`` about ``image``, as text deltas (through the engine,
    as the server answers); the last item is the whole answer as an ``Answer``."""
    loaded = engine.loaded
    prompt = conversation_prompt(loaded.processor, loaded.backbone, turns, question, loaded.template)
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


def open_picture(path: str, max_pixels: int) -> Any:
    """An image file opened under the image policy (one line when it is refused)."""
    return open_image({"path": path}, path, max_pixels)


class Session:
    """The terminal conversation: its image, its history, and the commands that change them."""

    def __init__(self, engine: Engine, image_path: str | None, max_new_tokens: int, out: TextIO, notes: TextIO):
        self.engine, self.max_new_tokens, self.out, self.notes = engine, max_new_tokens, out, notes
        self.max_pixels = engine.loaded.recipe.data.max_image_pixels
        self.image = open_picture(image_path, self.max_pixels) if image_path else None
        self.turns: list[tuple[str, str]] = []

    def note(self, text: str) -> None:
        print(f"m2pt: {text}", file=self.notes, flush=True)

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the user asked to leave."""
        line = line.strip()
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
        for item in ask(self.engine, self.image, self.turns, question, self.max_new_tokens):
            if isinstance(item, Answer):
                print(file=self.out, flush=True)
                self.turns.append((question, item.text))
            else:
                print(item, end="", file=self.out, flush=True)

    def run(self, lines: Iterator[str]) -> None:
        """Handle ``lines`` until one asks to leave or they end."""
        for line in lines:
            if not self.handle(line):
                break
