"""Run folders: ``runs/<recipe name>-<timestamp>`` holding the resolved recipe, logs, checkpoints, adapter."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from m2pt_cli import config
from m2pt_cli.config import Recipe
from m2pt_cli.errors import UserError
from m2pt_cli.files import write_text_atomic

RUNS = Path("runs")


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


RECIPE_FILE = "config.yaml"


def new_run_dir(recipe: Recipe, output_dir: str | None, overwrite: bool = False) -> Path:
    """The folder for a new run; refuses one that already holds a run unless ``overwrite``."""
    if output_dir is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("multi-process launch: pass --output-dir so every process writes to the same run")
        output_dir = str(RUNS / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(output_dir)
    if is_main_process() and (run_dir / RECIPE_FILE).exists():
        if not overwrite:
            raise UserError(f"{run_dir}: already holds a run; --resume {run_dir} continues it, --overwrite replaces it")
        shutil.rmtree(run_dir)
    return run_dir


def latest_run(name: str | None = None) -> Path:
    """The most recently modified run folder in ./runs (of recipe ``name`` if given)."""
    pattern = f"{name}-*" if name else "*"
    runs = [p for p in RUNS.glob(pattern) if (p / RECIPE_FILE).is_file()]
    if not runs:
        what = f" of recipe {name!r}" if name else ""
        raise UserError(f"no run{what} in {RUNS}/ to resume; pass the run folder: --resume RUN_DIR")
    return max(runs, key=lambda p: p.stat().st_mtime)


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resumed run must use the recipe it started with."""
    saved = config.read_yaml(run_dir / RECIPE_FILE)
    current = config.to_dict(recipe)

    def first_difference(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
                if found:
                    return found
            return None
        return prefix.rstrip(".") if a != b else None

    key = first_difference(saved, current)
    if key:
        raise UserError(
            f"{run_dir}: the recipe differs from the run's {RECIPE_FILE} at {key}; resume with the same recipe"
        )


def save_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Write the resolved recipe (main process only; others just make sure the folder exists)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_main_process():
        return
    write_text_atomic(run_dir / RECIPE_FILE, config.dump(recipe))
