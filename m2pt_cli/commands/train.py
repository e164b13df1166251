"""``m2pt train``: instruction-tune with M²PT (or a baseline) from a recipe."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from m2pt_cli.devices import device_option
from m2pt_cli.trust import trust_remote_code_option


@click.command()
@trust_remote_code_option
@click.argument("recipe", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run folder (default: runs/<name>-<time>).")
@click.option(
    "--resume",
    "resume",
    is_flag=False,
    flag_value="latest",
    default=None,
    metavar="[RUN_DIR]",
    help="Continue a run from its latest checkpoint (default: the newest run of this recipe).",
)
@click.option("--overwrite", is_flag=True, help="Replace a run already in --output-dir.")
@device_option
@click.option("--print-config", is_flag=True, help="Print the resolved recipe and exit.")
def train(
    recipe: str,
    overrides: tuple[str, ...],
    output_dir: str | None,
    resume: str | None,
    overwrite: bool,
    device: str | None,
    print_config: bool,
) -> None:
    """Train RECIPE with KEY=VALUE overrides; writes a run folder with checkpoints and the adapter.

    RECIPE is a YAML file or the name of a bundled recipe (m2pt recipes lists them).

    Multi-GPU: launch the same command through torchrun or accelerate, e.g.
    torchrun --nproc_per_node 8 -m m2pt_cli train RECIPE --output-dir runs/x

    \b
    Examples:
      m2pt train recipes/demo.yaml
      m2pt train demo train.max_steps=50
      m2pt train recipes/llava.yaml train.max_steps=3
      m2pt train recipes/llava.yaml --resume runs/llava-20261124-101500
    """
    from m2pt_cli import config, devices, runs

    cfg = config.load(recipe, overrides)
    if device is not None:  # none: the Trainer takes the launcher's device, else CUDA, else the CPU
        devices.resolve(device)
    if print_config:
        click.echo(config.dump(cfg), nl=False)
        return
    if resume is not None:
        run_dir = runs.latest_run(cfg.name) if resume == "latest" else Path(resume)
        if not (run_dir / runs.RECIPE_FILE).is_file():
            raise click.UsageError(f"--resume {run_dir}: not a run folder (no {runs.RECIPE_FILE})")
    else:
        run_dir = runs.run_path(cfg, output_dir)
    from m2pt_cli import locks

    with locks.hold(run_dir):  # one writer per run folder, until this command ends
        _train_in(run_dir, cfg, recipe, overrides, resume, overwrite, device)


def _train_in(run_dir: Path, cfg, recipe: str, overrides: tuple[str, ...], resume, overwrite: bool, device) -> None:
    """``train``'s work once it holds ``run_dir``'s lock."""
    from m2pt_cli import runs

    if resume is not None:
        runs.check_same_recipe(run_dir, cfg)
        runs.check_resumable(run_dir)
    else:
        runs.new_run_dir(cfg, str(run_dir), overwrite)
        runs.save_recipe(run_dir, cfg)
    main = runs.is_main_process()
    from m2pt_cli.logs import close_file_logs, setup

    setup(run_dir / "train.log", main)
    if main:
        click.echo(f"run folder: {run_dir}")
    finished = runs.finished_step(run_dir, cfg) if resume is not None else None
    if finished is not None:  # trained to its last step, adapter and summary written: nothing to do
        from m2pt_cli.checkpoints import latest_checkpoint

        latest_checkpoint(run_dir, say_skipped=True)  # says which torn checkpoints it passed over, as a resume does
        if main:
            click.echo(f"already finished: step {finished} is the last; nothing trained, nothing written")
            click.echo(f"adapter: {run_dir / 'adapter'}")
        close_file_logs()
        return
    from m2pt_cli.trainer import format_summary
    from m2pt_cli.trainer import train as run_training

    try:
        again = shlex.join(["m2pt", "train", recipe, *overrides, "--resume", str(run_dir)])  # exactly this run
        summary = run_training(cfg, run_dir, resume=resume is not None, device=device, resume_command=again)
    except BaseException:
        close_file_logs()
        if resume is None:  # a start that stopped before its first checkpoint leaves nothing behind
            runs.remove_failed_start(run_dir, created=False)  # the lock removes the folder if it made it
        raise
    close_file_logs()  # a later run in this process (a sweep, the Python API) logs to its own file only
    if main:
        click.echo(format_summary(summary))
