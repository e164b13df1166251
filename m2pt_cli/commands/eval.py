"""``m2pt eval``: score a model on benches (MME, POPE, TextVQA, ...) as the reference tools do."""

from __future__ import annotations

import time
from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.trust import trust_remote_code_option


@click.command("eval")
@trust_remote_code_option
@click.option("--bench", "benches", multiple=True, required=True, help="Bench name; repeat for several.")
@click.option("--adapter", type=click.Path(file_okay=False), help="Adapter, run or checkpoint folder.")
@click.option(
    "--recipe", type=click.Path(), help="Recipe file or bundled name of the model (with --adapter: its base)."
)
@click.option("--base", "use_base", is_flag=True, help="The base model without prompts or trained tensors.")
@click.option("--data", help="Hub id, data file(s) or folder instead of the bench's default data.")
@click.option("--split", help="Split of a hub dataset.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N samples of each bench.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Default: the bench's own (16 for MME).")
@click.option("--keep-wording", is_flag=True, help="Keep the bench's question wording (no short-answer suffix).")
@click.option("--metric", "qa_metric", default="exact", show_default=True, help="qa bench: exact, contains or vqa.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Default: RUN/eval-<time> or evals/<name>-<time>.")
@click.option(
    "--resume", is_flag=True, help="Continue the same evaluation in the output folder (same model and settings)."
)
@click.option("--overwrite", is_flag=True, help="Replace the evaluation files already in --output-dir.")
@click.option("--predictions", type=click.Path(dir_okay=False), help="Re-score this per-sample JSONL; no model.")
@device_option
def eval_command(
    benches,
    adapter,
    recipe,
    use_base,
    data,
    split,
    limit,
    batch_size,
    max_new_tokens,
    keep_wording,
    qa_metric,
    output_dir,
    resume,
    overwrite,
    predictions,
    device,
) -> None:
    """Evaluate a model on one or more benches and print a table of scores.

    Benches: mme, pope, textvqa, vsr, snli-ve, cifar10, cifar100, mnist, demo, qa. With no model
    option the newest run in ./runs is evaluated. Greedy decoding, left-padded batches.

    \b
    Examples:
      m2pt eval --bench mme
      m2pt eval --bench mme --bench pope --adapter runs/llava-20261124-101500 --batch-size 16
      m2pt eval --bench mme --recipe recipes/llava.yaml --base
      m2pt eval --bench demo --recipe demo --base
      m2pt eval --bench demo --adapter runs/demo-20261124-101500
      m2pt eval --bench qa --data questions.parquet --metric vqa --adapter my-adapter
      m2pt eval --bench mme --predictions evals/x/samples-mme.jsonl
      torchrun --nproc_per_node 8 -m m2pt_cli eval --bench mme --adapter my-adapter --output-dir evals/mme-8gpu
    """
    from m2pt_cli import devices, runs
    from m2pt_cli.errors import UserError
    from m2pt_cli.evaluate import EvalSettings, evaluate, format_table, rescore_file
    from m2pt_cli.files import refuse_link
    from m2pt_cli.ranks import launched
    from m2pt_cli.recipes import resolve

    settings = EvalSettings(
        data=data,
        split=split,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        keep_wording=keep_wording,
        qa_metric=qa_metric,
    )
    if predictions:
        if len(benches) != 1:
            raise click.UsageError("--predictions re-scores one bench: pass exactly one --bench")
        results = rescore_file(benches[0], Path(predictions), settings, Path(output_dir) if output_dir else None)
        click.echo(format_table(results))
        return
    spec = {
        "adapter": Path(adapter) if adapter else None,
        "recipe": resolve(recipe) if recipe else None,
        "base": use_base,
    }
    if adapter is None and recipe is None:
        spec["adapter"] = runs.latest_run()
        click.echo(f"evaluating the newest run: {spec['adapter']}")
    if output_dir is None and launched():
        raise UserError("multi-process launch: pass --output-dir so every process writes to the same evaluation")
    if output_dir is None:
        parent = (
            spec["adapter"] if spec["adapter"] is not None and (spec["adapter"] / "config.yaml").is_file() else None
        )
        name = "base" if use_base else "eval"
        if resume:
            folders = sorted((parent or Path("evals")).glob(f"{name}-*"), key=lambda p: p.lstat().st_mtime)
            if not folders:
                raise click.UsageError("--resume: no earlier eval folder found; pass --output-dir")
            out = refuse_link(folders[-1])  # found, not named: a link there is not the user's choice
        else:
            out = (parent or Path("evals")) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        out = Path(output_dir)
    device = devices.resolve(device)
    results = evaluate(spec, list(benches), settings, out, resume, device=device, overwrite=overwrite)
    if results is None:  # not rank 0 of a data-parallel launch: rank 0 reports
        return
    click.echo(format_table(results))
    click.echo(f"results: {out / 'results.json'}")
