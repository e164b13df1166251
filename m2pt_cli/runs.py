"""Run folders: ``runs/<recipe name>-<timestamp>`` holding the resolved recipe, logs, checkpoints, adapter."""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from pathlib import Path

from m2pt_cli import config
from m2pt_cli.config import Recipe
from m2pt_cli.continuation import first_difference
from m2pt_cli.errors import UserError
from m2pt_cli.files import refuse_links, write_text_atomic
from m2pt_cli.locks import is_lock
from m2pt_cli.ranks import launched
from m2pt_cli.reading import MiB, read_json

RUNS = Path("runs")


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


RECIPE_FILE = "config.yaml"
MAX_STATE_BYTES = 256 * MiB  # trainer_state.json: its log history grows with the steps


# What m2pt itself puts in a run folder: train (recipe, logs, checkpoints, adapter, tensorboard
# events), eval (eval-*, base-*), export (export-*), plot (plots/) and attention (attention.png).
TRAIN_ENTRIES = (
    RECIPE_FILE,
    "train.log",
    "metrics.jsonl",
    "summary.json",
    "adapter",
    "checkpoint-*",
    ".checkpoint-staging",
    "runs",
)
RUN_ENTRIES = (*TRAIN_ENTRIES, "eval-*", "base-*", "export-*", "plots", "attention.png", "attention.json")


def _own_entry(path: Path) -> bool:
    return not path.is_symlink() and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in RUN_ENTRIES)


def holds_training(run_dir: Path) -> bool:
    """Whether a run folder holds trained work (a checkpoint or an adapter); a failed start does not."""
    return (run_dir / "adapter").is_dir() or any(p.is_dir() for p in run_dir.glob("checkpoint-*"))


def entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, without the lock m2pt holds there while writing (``locks``)."""
    return sorted(p for p in folder.iterdir() if not is_lock(p))


def clear_run(run_dir: Path) -> None:
    """Remove a run's own files (``--overwrite``, a failed start); a folder holding anything else is refused."""
    held = entries(run_dir)
    foreign = [p for p in held if not _own_entry(p)]
    if foreign:
        raise UserError(
            f"{run_dir}: holds {foreign[0].name}, which m2pt did not write; m2pt replaces only a run's own files, "
            "so move it or pass another --output-dir"
        )
    for path in held:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def run_path(recipe: Recipe, output_dir: str | None) -> Path:
    """Where a new run goes: ``output_dir``, or ``runs/<name>-<time>``; nothing is checked or written."""
    if output_dir is None:
        if launched():
            raise UserError("multi-process launch: pass --output-dir so every process writes to the same run")
        output_dir = str(RUNS / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir}: exists and is not a folder")
    return run_dir


def new_run_dir(recipe: Recipe, output_dir: str | None, overwrite: bool = False) -> Path:
    """The folder for a new run (taken with ``locks.hold`` before this is called, so that what is
    checked here is not changed by another writer meanwhile).

    A folder holding trained work is refused unless ``overwrite``; one left by a start that failed
    before its first checkpoint is not a run to protect and is cleared. Either way only a run's own
    files are removed: a folder holding anything else is refused, naming the first such file.
    """
    run_dir = run_path(recipe, output_dir)
    if is_main_process() and run_dir.is_dir() and entries(run_dir):
        if holds_training(run_dir) and not overwrite:
            raise UserError(f"{run_dir}: already holds a run; --resume {run_dir} continues it, --overwrite replaces it")
        if (run_dir / RECIPE_FILE).exists() or overwrite:
            clear_run(run_dir)
        else:
            foreign = entries(run_dir)[0].name
            raise UserError(f"--output-dir {run_dir}: holds {foreign}; a new run needs a new or empty folder")
    return run_dir


def remove_failed_start(run_dir: Path, created: bool) -> None:
    """Undo a start that stopped before its first checkpoint: its own files, and the folder if it made it."""
    if not is_main_process() or not run_dir.is_dir() or holds_training(run_dir):
        return
    try:
        clear_run(run_dir)
        if created:
            run_dir.rmdir()
    except (UserError, OSError):
        pass  # someone else's file appeared meanwhile: leave the folder as it is


def latest_run(name: str | None = None) -> Path:
    """The most recently modified run folder in ./runs that holds trained work (of recipe ``name`` if given)."""
    pattern = f"{name}-*" if name else "*"
    runs = [p for p in RUNS.glob(pattern) if (p / RECIPE_FILE).is_file() and holds_training(p)]
    if not runs:
        what = f" of recipe {name!r}" if name else ""
        raise UserError(f"no run{what} in {RUNS}/ to resume; pass the run folder: --resume RUN_DIR")
    return max(runs, key=lambda p: p.stat().st_mtime)


def check_resumable(run_dir: Path) -> None:
    """Refuse to resume a run whose own entries (logs, checkpoints, staging folder, adapter) hold a
    symbolic link, before anything is written: training would write through it."""
    refuse_links(run_dir, TRAIN_ENTRIES)


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resumed run must use the recipe it started with (the saved one read through today's schema,
    so keys an older m2pt wrote at their defaults compare equal)."""
    saved = config.to_dict(config.load(run_dir / RECIPE_FILE))
    difference = first_difference(saved, config.to_dict(recipe))
    if difference:
        raise UserError(
            f"{run_dir}: the recipe differs from the run's {RECIPE_FILE} at {difference}; resume with the same recipe"
        )


def save_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Write the resolved recipe (main process only; others just make sure the folder exists)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_main_process():
        return
    write_text_atomic(run_dir / RECIPE_FILE, config.dump(recipe))


def last_step(checkpoint: Path, recipe: Recipe) -> int | None:
    """The step ``checkpoint`` holds when it is the run's last one, else None.

    The last step is ``train.max_steps``, or for a run counted in epochs the ``max_steps`` its Trainer
    state recorded (the same recipe on the same data counts the same). Resuming there must train
    nothing: the Trainer skips the batches already trained and checks ``max_steps`` only after a
    step, so it would train one step past the end and save a checkpoint of it.
    """
    try:
        state = read_json(Path(checkpoint) / "trainer_state.json", "trainer state", MAX_STATE_BYTES)
        step = int(state["global_step"])
        last = recipe.train.max_steps if recipe.train.max_steps > 0 else int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None  # resuming reads it again, and says what is wrong with it
    return step if 0 < last <= step else None


def finished_step(run_dir: Path, recipe: Recipe) -> int | None:
    """The last step when the run reached it and wrote its adapter and ``summary.json`` for it
    (nothing is left to do), else None."""
    from m2pt_cli import adapter as adapter_files
    from m2pt_cli import checkpoints

    latest = checkpoints.latest_checkpoint(run_dir)
    step = last_step(latest, recipe) if latest is not None else None
    if step is None or not (run_dir / "adapter" / adapter_files.WEIGHTS).is_file():
        return None
    try:
        summary = read_json(run_dir / "summary.json", "run summary")
    except (OSError, ValueError, UserError):
        return None
    return step if isinstance(summary, dict) and summary.get("steps") == step else None
