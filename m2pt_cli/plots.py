"""``m2pt plot``: PNG figures of a sweep (heatmap over two grid keys, bars over one) and training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from m2pt_cli.errors import UserError
from m2pt_cli.files import atomic_open, refuse_link, refuse_links
from m2pt_cli.sweep import HELD_OUT, parse_value, read_sweep

SIZE_INCHES = (6.4, 4.8)
DPI = 100  # figures are 640 x 480 px


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(metric: str) -> str:
    unit = " (%)" if any(s in metric for s in ("accuracy", "_acc", "f1", "precision", "recall", "ratio")) else ""
    if metric == HELD_OUT:
        return "held-out answer accuracy (%)"
    return metric.replace("/", ": ") + unit


def default_metric(rows: list[dict[str, Any]]) -> str:
    for row in rows:
        for key in row:
            if "/" in key:
                return key
    return HELD_OUT


def _save(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as handle:  # a new temporary file; a link at ``path`` is refused
        fig.savefig(handle, dpi=DPI, format="png")
    return path


def heatmap(spec: dict[str, Any], rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Metric over the first two grid keys (rows x columns), as the paper's prompt-length figure."""
    plt = _pyplot()
    (row_key, row_values), (col_key, col_values) = spec["grid"][0], spec["grid"][1]
    row_values = sorted(row_values, key=lambda v: (str(type(parse_value(v))), parse_value(v)))
    col_values = sorted(col_values, key=lambda v: (str(type(parse_value(v))), parse_value(v)))
    grid = [[math.nan] * len(col_values) for _ in row_values]
    for row in rows:
        if row.get("status") == "ok" and row.get(metric) is not None and row_key in row and col_key in row:
            grid[row_values.index(str(row[row_key]))][col_values.index(str(row[col_key]))] = float(row[metric])
    fig, ax = plt.subplots(figsize=SIZE_INCHES)
    image = ax.imshow(grid, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(col_values)), col_values)
    ax.set_yticks(range(len(row_values)), row_values)
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            ax.text(j, i, "failed" if math.isnan(value) else f"{value:.3g}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label=_label(metric))
    ax.set_title(f"{spec['name']}: {_label(metric)}")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def bars(spec: dict[str, Any], rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Metric for each value of the only grid key, or for each cell when the sweep names cells."""
    plt = _pyplot()
    if spec["grid"] and not spec.get("cells"):
        key, values = spec["grid"][0]
        found = {str(r.get(key)): r for r in rows}
    else:
        key, values = "cell", [r.get("cell", "?") for r in rows]
        found = {r.get("cell", "?"): r for r in rows}
    heights = []
    for value in values:
        row = found.get(value, {})
        ok = row.get("status") == "ok" and row.get(metric) is not None
        heights.append(float(row[metric]) if ok else 0.0)
    fig, ax = plt.subplots(figsize=SIZE_INCHES)
    ax.bar(range(len(values)), heights, color="#3b75af")
    by_cell = key == "cell"
    ax.set_xticks(range(len(values)), values, rotation=30 if by_cell else 0, ha="right" if by_cell else "center")
    ax.set_xlabel(key)
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{spec['name']}: {_label(metric)} by {key}")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def curves(runs: dict[str, Path], title: str, path: Path) -> Path:
    """Training loss against step and held-out accuracy for one or more run folders."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=SIZE_INCHES)
    for label, run in runs.items():
        entries = (
            [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            if (run / "metrics.jsonl").is_file()
            else []
        )
        steps = [e["step"] for e in entries if "loss" in e]
        loss_ax.plot(steps, [e["loss"] for e in entries if "loss" in e], label=label)
        points = [(e["step"], v) for e in entries for k, v in e.items() if k.endswith("_accuracy")]
        if points:
            acc_ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (nats per token)")
    acc_ax.set_xlabel("optimizer step")
    acc_ax.set_ylabel("held-out answer accuracy (share)")
    if len(runs) <= 8:
        loss_ax.legend(fontsize=7)
    fig.suptitle(f"{title}: training curves")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot(folder: Path, metric: str | None = None, output_dir: Path | None = None) -> list[Path]:
    """Figures for a sweep folder (heatmap or bars, and curves) or a run folder (curves)."""
    # FOLDER/plots must not be a link (an --output-dir given may be); no figure in it may be one
    output_dir = refuse_link(folder / "plots") if output_dir is None else output_dir
    refuse_links(output_dir, ("*.png",))
    if (folder / "metrics.jsonl").is_file():
        name = folder.name
        return [curves({name: folder}, name, output_dir / "curves.png")]
    spec, rows = read_sweep(folder)
    metric = metric or default_metric(rows)
    if not any(metric in r for r in rows):
        known = sorted({k for r in rows for k in r if isinstance(r.get(k), (int, float))})
        raise UserError(f"--metric {metric!r} is not in {folder}/table.json (has: {', '.join(known)})")
    safe = metric.replace("/", "_")
    out = []
    if len(spec["grid"]) >= 2 and not spec.get("cells"):
        out.append(heatmap(spec, rows, metric, output_dir / f"heatmap_{safe}.png"))
    else:
        out.append(bars(spec, rows, metric, output_dir / f"bars_{safe}.png"))
    runs = {p.parent.name: p for p in sorted((folder / "cells").glob("*/run")) if (p / "metrics.jsonl").is_file()}
    if runs:
        out.append(curves(runs, spec["name"], output_dir / "curves.png"))
    return out
