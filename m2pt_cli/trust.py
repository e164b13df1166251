"""Who may let a model's own code run: the person at the keyboard, never a file.

A recipe's ``model.trust_remote_code: true`` only says that the model needs the Python code shipped
in its repository. The code runs when the command line passes ``--trust-remote-code`` (or a Python
caller passes ``trust_remote_code=True`` to ``m2pt_cli.load``); otherwise loading stops with a
one-line error. ``m2pt info`` never runs model code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

FLAG = "--trust-remote-code"
_GRANTED: ContextVar[bool] = ContextVar("m2pt_remote_code_granted", default=False)


@contextmanager
def remote_code(granted: bool) -> Iterator[None]:
    """Within the block, models may run their repository's code if ``granted``."""
    token = _GRANTED.set(bool(granted))
    try:
        yield
    finally:
        _GRANTED.reset(token)


def remote_code_granted() -> bool:
    """Whether the person running m2pt allowed model code (``--trust-remote-code``)."""
    return _GRANTED.get()


def trust_remote_code_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Click decorator: add ``--trust-remote-code`` and grant model code for the command's duration."""
    import click

    @functools.wraps(command)
    def run(*args: Any, trust_remote_code: bool = False, **kwargs: Any) -> Any:
        with remote_code(trust_remote_code):
            return command(*args, **kwargs)

    help_text = "Run Python code shipped with the model (only one you trust; a recipe cannot allow it)."
    return click.option(FLAG, "trust_remote_code", is_flag=True, help=help_text)(run)
