"""One writer per folder: a lock file that m2pt holds in a folder while it writes there.

The lock is ``fcntl.flock`` on ``FOLDER/.m2pt-lock``: the kernel drops it when its process ends, by
exit, exception or ``kill -9``, so a crash never leaves a folder locked. The file also records the
holder (pid, host, command), so the second writer can say who holds the folder; a record left by a
process that ended without removing the file (a crash) is taken over with one log line. The file is
removed when the lock is released, so a finished command leaves no trace of it.

Why not the ``filelock`` package: a contender must read the holder's record from the locked file,
and a stale record must be told apart from a live one and reported; both are a few lines over
``flock`` and would be a layer around ``filelock``'s own file handling.

A data-parallel launch (torchrun) is one writer: only its rank 0 takes the lock (if that fails,
rank 0 exits 2 and the launcher stops the other ranks). A process may take the lock of a folder it
already holds (the Python API calling a command's function inside another): it simply holds on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from m2pt_cli.errors import UserError, quote

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; folders are not locked there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".m2pt-lock"
RECORD_BYTES = 4096  # the most of a holder's record that is read
COMMAND_CHARS = 1000  # the most of the holder's command it records (a record stays under RECORD_BYTES)
log = logging.getLogger("m2pt")
_held: dict[Path, int] = {}  # folder (resolved) -> the lock's file descriptor, in this process


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def command_line() -> str:
    """This process's command as a user would type it (``m2pt train ...``)."""
    argv = list(sys.argv) or ["m2pt"]
    if Path(argv[0]).name in ("m2pt", "__main__.py", "-m"):
        argv[0] = "m2pt"
    return shlex.join(argv)


def _record(command: str) -> bytes:
    command = command if len(command) <= COMMAND_CHARS else command[: COMMAND_CHARS - 3] + "..."
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}).encode()


def _read_record(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, RECORD_BYTES, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder(record: dict) -> str:
    pid = record.get("pid")
    if pid is None:  # locked a moment ago, its record not yet written
        return "another m2pt process (just starting)"
    host = record.get("host")
    where = f" on {quote(host)}" if host and host != socket.gethostname() else ""
    command = record.get("command")
    return f"pid {quote(pid)}{where} ({quote(command) if command else 'command unknown'})"


def alive(pid: object) -> bool:
    """Whether process ``pid`` of this machine is running."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _open_locked(folder: Path, lock_path: Path) -> int:
    """An open descriptor of ``lock_path`` holding its flock; a held lock is a ``UserError``."""
    for _ in range(100):  # a holder that releases removes the file: lock the new one
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            record = _read_record(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise UserError(
                f"{folder}: in use by {_holder(record)}; wait for it to finish or pass another folder"
            ) from None
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file we locked was removed by its holder meanwhile
        time.sleep(0.01)
    raise UserError(f"{folder}: could not take {LOCK_FILE} (it keeps being replaced)")


@contextmanager
def hold(folder: Path, command: str | None = None) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block; yields ``folder``.

    ``folder`` and its missing parents are created, and removed again at the end if they are still
    empty then (a command refused or failed before writing leaves nothing behind). Another live
    process holding the lock is a one-line ``UserError`` naming the folder, the holder's pid and
    command. Ranks other than 0 of a data-parallel launch take no lock (rank 0 holds it for the
    launch); a folder this process already holds is simply held on.
    """
    folder = Path(folder)
    if fcntl is None or not _main_rank():
        yield folder
        return
    if folder.is_symlink() and not folder.is_dir():
        raise UserError(f"{folder}: is a symbolic link to nothing; pass a folder")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    created = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = folder.resolve()
        if key in _held:
            yield folder
            return
        lock_path = folder / LOCK_FILE
        if lock_path.is_symlink():
            raise UserError(f"{lock_path} is a symbolic link; m2pt does not write through links in an output folder")
        fd = _open_locked(folder, lock_path)
        try:
            stale = _read_record(fd)
            if stale.get("pid") is not None:
                here = stale.get("host") in (None, socket.gethostname())
                state = "is no longer running" if here and not alive(stale.get("pid")) else "no longer holds it"
                log.warning("%s: taking over the lock left by %s, which %s", folder, _holder(stale), state)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _record(command or command_line()), 0)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = fd
        try:
            yield folder
        finally:
            _release(_held.pop(key), lock_path)
    finally:
        for path in created:  # innermost first; one that holds anything stays, and so do its parents
            try:
                path.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG):  # never made: try its parent
                    break


def _release(fd: int, lock_path: Path) -> None:
    """Remove the lock file (while still holding it: a contender then locks a new file), then unlock."""
    try:
        if os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            lock_path.unlink()
    except OSError:
        pass  # the folder went away meanwhile: nothing to remove
    finally:
        os.close(fd)


def is_lock(path: Path) -> bool:
    """Whether ``path`` is a folder lock (skipped when a folder's own entries are listed)."""
    return Path(path).name == LOCK_FILE
