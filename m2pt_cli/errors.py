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


def quote(value: Any) -> str:
    """``repr(value)`` cut short (nested and long values elided with ``...``): error messages quote
    what a file holds, and a few hundred bytes of YAML aliases can expand to gigabytes."""
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."
