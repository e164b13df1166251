"""The ``m2pt`` logger: messages to stderr, and to a run's log file when there is one."""

from __future__ import annotations

import logging
from pathlib import Path

from m2pt_cli.files import open_append

LOGGER = logging.getLogger("m2pt")


class LogFile(logging.FileHandler):
    """A log file opened for appending through ``files.open_append``: a planted link is refused, not followed."""

    def _open(self):
        return open_append(Path(self.baseFilename), encoding=self.encoding, errors=self.errors)


def setup(log_file: Path | None = None, main: bool = True) -> logging.Logger:
    """Console output (info on the main process, warnings elsewhere) plus an optional log file."""
    LOGGER.setLevel(logging.INFO if main else logging.WARNING)
    LOGGER.propagate = False  # its own handlers; a library's logging.basicConfig() must not print it twice
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in LOGGER.handlers
    ):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(console)
    if main and log_file is not None:
        file = LogFile(log_file)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        LOGGER.addHandler(file)
    return LOGGER


def close_file_logs() -> None:
    """Close and detach the run's log file (before a failed start's files are removed)."""
    for handler in [h for h in LOGGER.handlers if isinstance(h, logging.FileHandler)]:
        handler.close()
        LOGGER.removeHandler(handler)
