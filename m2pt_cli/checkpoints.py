"""Checkpoint folders that are whole or absent.

The Trainer writes a checkpoint into a hidden staging folder inside the run; only when every file
is written and synced is it renamed to ``checkpoint-N`` (a rename within one file system is
atomic), and only then are older checkpoints rotated away. A crash, ``kill -9`` or a full disk in
the middle of a save leaves at most the staging folder, which the next save removes and which
resume never reads.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from m2pt_cli import adapter as adapter_files
from m2pt_cli.errors import UserError, first_line
from m2pt_cli.files import refuse_link

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".checkpoint-staging"
# what every whole checkpoint holds: the adapter and the Trainer state, which the Trainer writes last
REQUIRED = (adapter_files.CONFIG, adapter_files.WEIGHTS, "trainer_state.json")
LOGGER = logging.getLogger("m2pt")


def _step(folder: Path) -> int:
    match = CHECKPOINT.match(folder.name)
    return int(match[1]) if match else -1


def missing_file(folder: Path) -> str:
    """The first file a whole checkpoint needs that ``folder`` lacks, or ''."""
    return next((name for name in REQUIRED if not (folder / name).is_file()), "")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, whole or torn, oldest step first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if _step(p) >= 0 and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=_step)


def latest_checkpoint(run_dir: Path, say_skipped: bool = False) -> Path | None:
    """The newest whole checkpoint; torn ones (an older m2pt's, or a copy) are skipped, and said."""
    for folder in reversed(checkpoints(run_dir)):
        missing = missing_file(folder)
        if not missing:
            return folder
        if say_skipped:
            LOGGER.warning("skipping torn checkpoint %s (no %s)", folder, missing)
    return None


def staging_folder(run_dir: Path) -> Path:
    return Path(run_dir) / STAGING


def clear_staging(run_dir: Path) -> None:
    """Remove what an interrupted save left (nothing else is ever in the staging folder).

    A link planted there is refused: the Trainer would write the next checkpoint through it."""
    shutil.rmtree(refuse_link(staging_folder(run_dir)), ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(run_dir: Path, name: str) -> Path:
    """Sync the staged checkpoint ``name`` and rename it into the run; returns its final path."""
    staged, final = staging_folder(run_dir) / name, refuse_link(Path(run_dir) / name)
    for path in staged.iterdir():
        _fsync(path)
    _fsync(staged)
    if final.exists():  # the same step saved again (an interrupt right after a save): swap, then drop the old
        old = staging_folder(run_dir) / f"{name}.old"
        os.replace(final, old)
    os.replace(staged, final)
    _fsync(Path(run_dir))
    clear_staging(run_dir)
    return final


def rotate(run_dir: Path, keep: int | None) -> None:
    """Delete whole checkpoints beyond the newest ``keep`` (never the newest whole one; torn ones stay)."""
    if not keep or keep < 1:
        return
    whole = [p for p in checkpoints(run_dir) if not missing_file(p)]
    for folder in whole[:-keep]:
        shutil.rmtree(folder)


def save_failed(run_dir: Path, name: str, exc: BaseException, resume_command: str) -> UserError:
    """The one-line error for a checkpoint that could not be written (full disk or other write error)."""
    free = shutil.disk_usage(run_dir).free if Path(run_dir).exists() else 0
    last = latest_checkpoint(run_dir)
    full = free < 1 << 20 or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    reason = "the disk is full" if full else first_line(exc)
    where = f"resume from {last.name} once there is room: {resume_command}" if last else "no complete checkpoint yet"
    return UserError(
        f"cannot save {name} in {run_dir} ({reason}; {free / 1024:.0f} KiB free); nothing partial was kept; {where}"
    )
