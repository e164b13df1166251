"""Writing files so that an interruption or a full disk never leaves a partial one, and never
through a symbolic link planted in an output folder.

The folder a user names for output may itself be a link (to scratch storage, say); what m2pt
writes inside it, files and subfolders, may not be: a folder handed over by someone else (a run to
resume, an evaluation to continue, a sweep) could hold a link that sends a write anywhere. ``root``
below is the folder the user chose: every path component strictly below it is checked.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from m2pt_cli.errors import UserError, quote

LINKED = "is a symbolic link; m2pt does not write through links in an output folder"


def plain_name(name: str, what: str) -> str:
    """``name`` when it can be one path component (a file or folder name), else a one-line
    ``UserError`` naming ``what``: not empty, not ``.`` or ``..``, no ``/``, ``\\`` or NUL, and
    printable (no line breaks or terminal escapes, which a printed command would not reproduce)."""
    if not name or name in (".", "..") or any(char in name for char in ("/", "\\", "\0")) or not name.isprintable():
        raise UserError(
            f"{what}: {quote(name)} is not allowed; it must be a plain folder name "
            "(not empty, '.' or '..'; no '/', '\\', NUL or control characters)"
        )
    return name


def refuse_link(path: Path, root: Path | None = None) -> Path:
    """``path``, once neither it nor any folder between ``root`` (excluded) and it is a symbolic link.

    Without ``root`` only ``path`` itself is checked. A link is a one-line ``UserError`` naming it.
    """
    path = Path(path)
    candidates = [path]
    if root is not None:
        parts = path.relative_to(root).parts
        candidates = [Path(root).joinpath(*parts[: i + 1]) for i in range(len(parts))]
    for candidate in candidates:
        if candidate.is_symlink():
            raise UserError(f"{candidate} {LINKED}")
    return path


def refuse_links(root: Path, patterns: tuple[str, ...] = ("*",)) -> None:
    """Refuse a symbolic link among the entries of ``root`` named by ``patterns`` (globs), or anywhere
    below them; ``root`` itself may be a link. Commands call it before they write into a folder they
    were handed, so that nothing is written when one is found."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns):
            continue
        refuse_link(entry)
        if entry.is_dir():
            for folder, dirs, names in os.walk(entry):  # never follows links
                for name in sorted(dirs + names):
                    refuse_link(Path(folder) / name)


def make_folder(path: Path, root: Path | None = None) -> Path:
    """Create ``path`` and its missing parents; neither it nor a folder below ``root`` may be a link."""
    path = refuse_link(Path(path), root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_open(path: Path, mode: str = "w", root: Path | None = None) -> Iterator[IO]:
    """An open file that becomes ``path`` when the block ends (removed if it raises).

    It is a hidden sibling created exclusively under a new name, so no file or link planted beside
    ``path`` is ever written through; ``path`` (and every folder below ``root``) may not be a link.
    ``mode`` is ``"w"`` (UTF-8 text) or ``"wb"``.
    """
    path = refuse_link(Path(path), root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; give it a plain file's permissions
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, root: Path | None = None) -> Path:
    """Write ``text`` to a new hidden temporary sibling, then rename it over ``path`` (``atomic_open``)."""
    with atomic_open(path, "w", root) as handle:
        handle.write(text)
    return Path(path)


def open_append(path: Path, root: Path | None = None, encoding: str | None = "utf-8", errors: str | None = None):
    """``path`` opened for appending (created if missing); a symbolic link there is refused, not followed."""
    path = refuse_link(Path(path), root)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link planted after the check above
            raise UserError(f"{path} {LINKED}") from None
        raise
    return os.fdopen(fd, "a", encoding=encoding, errors=errors)
