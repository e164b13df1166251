"""The error users can fix: the CLI prints its one-line message and exits with code 2."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from typing import Any

_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 2, 80, 80, 40
_QUOTE.maxdict = _QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = 4
QUOTE_CHARS = 160
# A printed error line: long enough for a few paths and quoted values, bounded whatever a file holds.
LINE_CHARS = 2000


class UserError(Exception):
    """Bad input (a recipe, an override, a path, an adapter). The message says what to fix.

    The CLI prints the message on one line and exits with ``exit_code``.
    """

    exit_code = 2


class Interrupted(UserError):
    """A run stopped by Ctrl-C or SIGTERM after saving what it could; the message says how to resume."""

    exit_code = 130


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line errors that quote a library's reason."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def quote(value: Any, bare: bool = False) -> str:
    """``repr(value)`` cut short (nested and long values elided with ``...``): error messages quote
    what a file holds, and a few hundred bytes of YAML aliases can expand to gigabytes. Control
    characters are escaped (``repr`` writes ``\\x1b``, ``\\n``), so a file cannot forge terminal output.

    Args:
        bare: a short printable string (a record id, a name) is shown as itself, without quotes;
            any other value is quoted as above.
    """
    if bare and isinstance(value, str) and 0 < len(value) <= QUOTE_CHARS and value.isprintable():
        return value
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def first_lines(message: str) -> str:
    """An exception's message for a one-line report: its first non-empty line, and while a line ends
    with a colon (``backend='inductor' raised:``, the cause below it) the next one too."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    kept = lines[:1]
    for line in lines[1:4]:
        if not kept[-1].endswith(":"):
            break
        kept.append(line)
    return " ".join(kept)


def one_line(message: str, limit: int = LINE_CHARS) -> str:
    """``message`` as one printable line: control characters (line breaks, escapes) written as
    ``repr`` writes them, and cut at ``limit`` characters keeping its start (where the file and the
    reason are named). The CLI's last guard: values are quoted with ``quote`` where they are read."""
    if len(message) > 4 * limit:  # escaping at most quadruples a character: look at no more than needed
        message = message[: 4 * limit]
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)
    return text if len(text) <= limit else text[: limit - 3] + "..."
