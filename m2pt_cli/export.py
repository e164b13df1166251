"""``m2pt export`` formats: a plain adapter folder (safetensors) or a Hugging Face hub folder (hf)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from m2pt_cli import adapter as adapter_files
from m2pt_cli import config as recipe_config
from m2pt_cli import export_bounds, locks
from m2pt_cli.backbones.base import DTYPES
from m2pt_cli.errors import UserError
from m2pt_cli.files import write_text_atomic
from m2pt_cli.model_source import resolve_model_source
from m2pt_cli.reading import read_json
from m2pt_cli.registry import Registry

EXPORT_FORMATS = Registry("export format")
EXPORT_FORMATS.register("safetensors", "m2pt_cli.export:export_safetensors")
EXPORT_FORMATS.register("hf", "m2pt_cli.export:export_hf")


def _towers(meta: dict[str, Any]) -> dict[str, Any]:
    cfg = meta["m2pt_config"]
    return {
        tower: {
            "prompt_length": cfg[f"{tower}_length"],
            "layers": cfg[f"{tower}_layers"],
            "width": cfg[f"{tower}_width"],
            "total_layers": cfg[f"{tower}_total_layers"],
        }
        for tower in ("vision", "text")
    }


def export_safetensors(
    source: Path,
    output: Path,
    dtype: str | None,
    overwrite: bool = False,
    max_bytes: int = export_bounds.MAX_ADAPTER_BYTES,
) -> Path:
    """Copy the adapter (optionally cast) with its metadata and resolved recipe, atomically.

    The adapter is checked within bounds before it is hashed (:mod:`m2pt_cli.export_bounds`)."""
    resolved = resolve_model_source(source, export_limit=max_bytes)
    state = adapter_files.read_tensors(resolved.adapter)
    recipe = resolved.recipe
    meta = {
        k: v
        for k, v in resolved.adapter_meta.items()
        if k not in ("format_version", "m2pt_version", "dtype", "tensors", "sha256")
    }
    meta["towers"] = _towers(meta)
    meta["trained_modules"] = meta["m2pt_config"]["trainable"]
    return adapter_files.write_adapter(
        output,
        state,
        meta,
        dtype=DTYPES[dtype] if dtype else None,
        extra_files={adapter_files.RECIPE: recipe_config.dump(recipe)},
        overwrite=overwrite,
    )


def export_hf(
    source: Path,
    output: Path,
    dtype: str | None,
    overwrite: bool = False,
    max_bytes: int = export_bounds.MAX_ADAPTER_BYTES,
) -> Path:
    """The safetensors export plus a model card (README.md), ready for ``huggingface-cli upload``."""
    folder = export_safetensors(source, output, dtype, overwrite, max_bytes)
    meta = adapter_files.read_meta(folder)
    card = model_card(meta, _metrics(source))
    write_text_atomic(folder / adapter_files.CARD, card)
    return folder


def _metrics(source: Path) -> dict[str, Any]:
    """Results found in the run the adapter comes from (summary.json, eval results)."""
    metrics: dict[str, Any] = {}
    for run in (source.parent, source.parent.parent):
        summary = run / "summary.json"
        if summary.is_file():
            data = read_json(summary, "run summary")
            for key in ("held_out_accuracy_before", "held_out_accuracy_after", "steps", "final_loss"):
                if data.get(key) is not None:
                    metrics[key] = data[key]
        for results in sorted(run.glob("eval*/results.json")):
            for bench, values in read_json(results, "results file").get("metrics", {}).items():
                metrics.update({f"{bench}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        if metrics:
            break
    return metrics


def model_card(meta: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A Hugging Face model card for an exported adapter."""
    params = meta.get("parameters", {})
    trained = sum(params.values())
    towers = meta["towers"]
    lines = [
        "---",
        f"base_model: {meta['base_model']}",
        "library_name: m2pt",
        "tags: [m2pt, multimodal-prompt-tuning, peft]",
        "---",
        "",
        f"# M²PT adapter for {meta['base_model']}",
        "",
        f"Multimodal Prompt Tuning (M²PT, EMNLP 2024) adapter, method `{meta.get('method', 'm2pt')}`, "
        f"backbone `{meta['backbone']}`: {trained:,} trained values in `adapter.safetensors` "
        f"({', '.join(f'{k} {v:,}' for k, v in params.items())}).",
        "",
        "| tower | prompt length | layers | width |",
        "|---|---|---|---|",
    ]
    for name, tower in towers.items():
        layers = tower["layers"]
        span = f"{layers[0]}-{layers[-1]} ({len(layers)} of {tower['total_layers']})" if layers else "none"
        lines.append(f"| {name} | {tower['prompt_length']} | {span} | {tower['width']} |")
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Usage",
        "",
        "```bash",
        "pip install m2pt",
        "m2pt generate --adapter THIS_FOLDER --image cat.png --prompt 'What is in the picture?'",
        "```",
        "",
        "```python",
        "import m2pt_cli",
        "model, processor = m2pt_cli.load('THIS_FOLDER')  # base=... to point at local weights",
        "```",
        "",
        "The resolved training recipe is in `recipe.yaml`; `m2pt_adapter.json` records the base model,",
        "prompt layers and the checksum of the tensor file.",
        "",
    ]
    return "\n".join(lines)


def export(
    source: Path,
    fmt: str,
    output: Path | None,
    dtype: str | None,
    overwrite: bool = False,
    max_bytes: int = export_bounds.MAX_ADAPTER_BYTES,
) -> Path:
    """Export the adapter at ``source`` (run, adapter or checkpoint folder) in format ``fmt``.

    ``output`` must be new, empty, or hold an earlier m2pt adapter (replaced only with ``overwrite``).
    An adapter declaring more than ``max_bytes`` of tensors is refused before it is hashed.
    """
    adapter = adapter_files.find_adapter(source)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    run = adapter.parent if adapter.name in ("adapter",) or adapter.name.startswith("checkpoint-") else adapter
    if output is None:
        output = run / f"export-{fmt}"
    refuse_own_files(adapter, run, Path(output))
    writer = EXPORT_FORMATS.get(fmt)
    with locks.hold(Path(output)):  # one writer per export folder
        adapter_files.check_destination(Path(output), overwrite)
        return writer(adapter, Path(output), dtype, overwrite, max_bytes)


def refuse_own_files(adapter: Path, run: Path, output: Path) -> None:
    """Refuse an ``output`` that is the adapter being exported or inside it, the run it comes from, or
    inside one of that run's own entries (its adapter, checkpoints, evaluations, ...): an export
    writes beside what it exports from (``RUN/export-*``, or any other folder), never over it."""
    from m2pt_cli.runs import RECIPE_FILE, RUN_ENTRIES

    target = output.resolve()
    what = None
    if target == adapter.resolve() or adapter.resolve() in target.parents:
        what = f"the adapter being exported ({adapter})"
    elif (run / RECIPE_FILE).is_file() and (target == run.resolve() or run.resolve() in target.parents):
        inside = target.relative_to(run.resolve()).parts
        own = [pattern for pattern in RUN_ENTRIES if pattern != "export-*"]
        if not inside or any(fnmatch.fnmatchcase(inside[0], pattern) for pattern in own):
            what = f"the run being exported ({run})" if not inside else f"the run's own {inside[0]} ({run})"
    if what:
        raise UserError(
            f"--output {output}: is {what}; an export never writes over what it exports from or a run's own "
            f"files; pass another folder (default: {run / 'export-FORMAT'})"
        )
