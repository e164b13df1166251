"""``m2pt sweep``: train and evaluate every cell of a grid of recipe overrides, into one table."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import re
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from m2pt_cli import config as recipe_config
from m2pt_cli import locks
from m2pt_cli.continuation import MISSING, check_same, read_record
from m2pt_cli.errors import UserError, first_line
from m2pt_cli.files import plain_name, refuse_links, write_text_atomic
from m2pt_cli.reading import read_json

log = logging.getLogger("m2pt")
TABLE = "table"
CELL = "cell.json"
SWEEP_ENTRIES = ("sweep.json", f"{TABLE}.json", f"{TABLE}.csv", "cells")  # what a sweep writes in its folder
# the training's held-out answer accuracy, in percent like every bench metric of the table
HELD_OUT = "held_out_accuracy_percent"


def split_values(text: str) -> list[str]:
    """Split ``a,b,[1, 2],0-15`` at top-level commas (not inside brackets)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _assignment(item: str, where: str, expected: str) -> tuple[str, str]:
    """``KEY=VALUE`` split, the key checked against the recipe schema (a typo gets a suggestion);
    ``where`` names the option in an error."""
    key, sep, value = item.partition("=")
    if not sep or not key or not value.strip():
        raise UserError(f"{where}: expected {expected}")
    recipe_config.apply_override({}, key.split("."), None)  # unknown keys fail here
    return key, value.strip()


def parse_grid(items: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """``KEY=V1,V2`` options -> [(key, [raw values])], keys checked against the recipe schema."""
    expected = "KEY=V1,V2,..., e.g. prompts.text.length=0,10"
    return [(key, split_values(values)) for key, values in (_assignment(i, f"--grid {i!r}", expected) for i in items)]


def parse_cells(items: tuple[str, ...]) -> list[list[tuple[str, str]]]:
    """``--cell "KEY=V KEY=V"`` options -> one assignment each (shell-quoted words), keys checked."""
    expected = "KEY=VALUE ..., e.g. 'method=full train.learning_rate=2e-5'"
    parsed = []
    for item in items:
        try:
            words = shlex.split(item)
        except ValueError as exc:
            raise UserError(f"--cell {item!r}: {exc}") from None
        if not words:
            raise UserError(f"--cell {item!r}: expected {expected}")
        parsed.append([_assignment(word, f"--cell {item!r}", expected) for word in words])
    return parsed


def cell_name(assignment: list[tuple[str, str]]) -> str:
    text = "__".join(f"{k.split('.')[-2] + '.' if k.count('.') else ''}{k.split('.')[-1]}={v}" for k, v in assignment)
    return plain_name(re.sub(r"[^A-Za-z0-9_.=-]+", "", text.replace(", ", "-").replace(",", "-")), "--grid")


def cells(grid: list[tuple[str, list[str]]], extra: list[list[tuple[str, str]]] = ()) -> list[list[tuple[str, str]]]:
    """Every combination of the grid's values, then the ``extra`` cells as given (no grid: only those)."""
    keys = [k for k, _ in grid]
    combos = itertools.product(*(v for _, v in grid)) if grid else ()
    product = [list(zip(keys, combo, strict=True)) for combo in combos]
    every = product + [list(cell) for cell in extra]
    names = [cell_name(cell) for cell in every]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise UserError(f"sweep: the cell {repeated} is given twice (--grid and --cell overlap)")
    return every


def percent(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def current_row(row: dict[str, Any]) -> dict[str, Any]:
    """A cell's row as this m2pt writes it: an older m2pt's ``held_out_accuracy`` (a share) in percent."""
    if "held_out_accuracy" not in row or HELD_OUT in row:
        return row
    return {
        HELD_OUT if key == "held_out_accuracy" else key: percent(value) if key == "held_out_accuracy" else value
        for key, value in row.items()
    }


def write_table(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``table.json`` and ``table.csv``: one row per cell, every metric as a column; accuracies in
    percent (the bench metrics as each bench gives them, the held-out accuracy as ``HELD_OUT``)."""
    write_text_atomic(out_dir / f"{TABLE}.json", json.dumps(rows, indent=2) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / f"{TABLE}.csv", buffer.getvalue())


def commands(
    recipe: str, grid, benches: tuple[str, ...], out_dir: Path, overrides: tuple[str, ...], extra=()
) -> list[str]:
    """One shell command per cell (train, then evaluate), for a cluster scheduler."""
    lines = []
    for assignment in cells(grid, extra):
        cell_dir = out_dir / "cells" / cell_name(assignment)
        sets = [f"{k}={v}" for k, v in assignment]
        train = ["m2pt", "train", recipe, *overrides, *sets, "--output-dir", str(cell_dir / "run")]
        line = shlex.join(train)
        if benches:
            evaluate = [
                "m2pt",
                "eval",
                *sum((["--bench", b] for b in benches), []),
                "--adapter",
                str(cell_dir / "run"),
                "--output-dir",
                str(cell_dir / "eval"),
            ]
            line += " && " + shlex.join(evaluate)
        lines.append(line)
    return lines


def _row_from_outputs(assignment, cell_dir: Path) -> dict[str, Any] | None:
    """A finished cell's row from its run and eval folders (also for cells run by --print-commands)."""
    summary_path = cell_dir / "run" / "summary.json"
    if not summary_path.is_file():
        return None
    summary = read_json(summary_path, "run summary")
    row: dict[str, Any] = {"cell": cell_name(assignment), **{k: v for k, v in assignment}}
    row.update(
        status="ok",
        trainable_parameters=summary["trainable_parameters"],
        train_seconds=summary["seconds"],
        final_loss=summary["final_loss"],
    )
    row[HELD_OUT] = percent(summary["held_out_accuracy_after"])  # summary.json holds a share
    results = cell_dir / "eval" / "results.json"
    if results.is_file():
        for bench, metrics in read_json(results, "results file").get("metrics", {}).items():
            row.update({f"{bench}/{k}": v for k, v in metrics.items()})
    return row


SWEEP_IDENTITY = ("recipe_sha256", "grid", "cells", "benches", "overrides")


def check_continuation(out_dir: Path, spec: dict[str, Any], resume: bool) -> None:
    """Refuse a folder holding a sweep unless ``resume`` continues the same one (recipe, grid, benches)."""
    recorded_path = out_dir / "sweep.json"
    if not recorded_path.is_file():
        return
    if not resume:
        raise UserError(f"{out_dir}: already holds a sweep; --resume continues it, or pass another --output-dir")
    way_out = "pass another --output-dir for the changed sweep"
    recorded = read_record(recorded_path, way_out)
    old = {key: recorded.get(key, [] if key == "cells" else MISSING) for key in SWEEP_IDENTITY}  # older: no cells
    check_same(str(recorded_path), "sweep", old, {key: spec[key] for key in SWEEP_IDENTITY}, way_out)


def run(
    recipe_path: Path,
    grid,
    benches: tuple[str, ...],
    out_dir: Path,
    resume: bool,
    overrides: tuple[str, ...] = (),
    device: str = "cpu",
    extra: list[list[tuple[str, str]]] = (),
) -> list[dict[str, Any]]:
    """Train and evaluate each cell in turn (the grid's, then ``extra``); a failing cell is recorded and
    the sweep goes on."""
    base = recipe_config.load(recipe_path, overrides)
    spec = {
        "recipe": str(recipe_path),
        "recipe_sha256": hashlib.sha256(recipe_config.dump(base).encode()).hexdigest(),
        "name": base.name,
        "grid": grid,
        "cells": [list(cell) for cell in extra],
        "benches": list(benches),
        "overrides": list(overrides),
    }
    spec = json.loads(json.dumps(spec))  # tuples as JSON lists, as recorded
    with locks.hold(out_dir):  # one writer per sweep folder; its cells are this process's
        return _run_in(recipe_path, grid, benches, out_dir, resume, overrides, device, extra, spec)


def _run_in(recipe_path, grid, benches, out_dir, resume, overrides, device, extra, spec) -> list[dict[str, Any]]:
    """``run``'s work once it holds ``out_dir``'s lock."""
    from m2pt_cli.evaluate import EvalSettings, evaluate
    from m2pt_cli.runs import clear_run, save_recipe
    from m2pt_cli.trainer import train

    check_continuation(out_dir, spec, resume)
    refuse_links(out_dir, SWEEP_ENTRIES)  # a sweep folder handed over must not send a cell's writes elsewhere
    write_text_atomic(out_dir / "sweep.json", json.dumps(spec, indent=2))
    rows = []
    for assignment in cells(grid, extra):
        name = cell_name(assignment)
        cell_dir = out_dir / "cells" / name
        if resume:
            row = current_row(read_json(cell_dir / CELL, "cell record")) if (cell_dir / CELL).is_file() else None
            if row is None and (not benches or (cell_dir / "eval" / "results.json").is_file()):
                row = _row_from_outputs(assignment, cell_dir)  # run by a --print-commands line
                if row is not None:
                    write_text_atomic(cell_dir / CELL, json.dumps(row, indent=2) + "\n", root=out_dir)
            if row is not None and row.get("status") == "ok":
                row = {"cell": name, **row}  # an older m2pt's row has no cell name
                log.info("sweep: %s done, skipped", name)
                rows.append(row)
                continue
        started = time.time()
        log.info("sweep: cell %s", name)
        try:
            recipe = recipe_config.load(recipe_path, tuple(overrides) + tuple(f"{k}={v}" for k, v in assignment))
            run_dir = cell_dir / "run"
            with locks.hold(run_dir):  # as `m2pt train` holds its run folder
                if run_dir.exists():  # an unfinished attempt: start the cell again
                    clear_run(run_dir)
                save_recipe(run_dir, recipe)
                train(recipe, run_dir, device=device)
            if benches:
                evaluate(
                    {"adapter": run_dir},
                    list(benches),
                    EvalSettings(),
                    cell_dir / "eval",
                    False,
                    device,
                    overwrite=True,
                )
            row = _row_from_outputs(assignment, cell_dir) or {}
        except Exception as exc:  # noqa: BLE001 - a failed cell is data, the sweep goes on
            row = {"cell": name, **{k: v for k, v in assignment}, "status": "failed", "error": first_line(exc)}
            log.warning("sweep: cell %s failed: %s", name, row["error"])
        row["wall_seconds"] = round(time.time() - started, 1)
        write_text_atomic(cell_dir / CELL, json.dumps(row, indent=2) + "\n", root=out_dir)
        rows.append(row)
        write_table(out_dir, rows)
    write_table(out_dir, rows)
    return rows


def read_sweep(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep description and its table."""
    spec, table = folder / "sweep.json", folder / f"{TABLE}.json"
    if not spec.is_file() or not table.is_file():
        raise UserError(f"{folder}: not a sweep folder (needs sweep.json and {TABLE}.json)")
    return read_json(spec, "sweep description"), read_json(table, "sweep table")


def parse_value(text: str) -> Any:
    """A grid value as the recipe reads it (for sorting and axis labels)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
