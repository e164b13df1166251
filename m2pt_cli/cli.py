"""The ``m2pt`` command: a click group whose subcommands load lazily (``m2pt --help`` imports no torch)."""

from __future__ import annotations

import errno
import importlib
import os
from pathlib import Path

import click

from m2pt_cli import __version__
from m2pt_cli.errors import UserError, first_lines, one_line, quote

# name -> "module:command"; each module imports torch only inside its command.
SUBCOMMANDS = {
    "attention": "m2pt_cli.commands.sweep:attention",
    "bench": "m2pt_cli.commands.bench:bench",
    "chat": "m2pt_cli.commands.chat:chat",
    "data": "m2pt_cli.commands.data:data",
    "env": "m2pt_cli.commands.env:env",
    "eval": "m2pt_cli.commands.eval:eval_command",
    "export": "m2pt_cli.commands.export:export",
    "generate": "m2pt_cli.commands.generate:generate",
    "info": "m2pt_cli.commands.info:info",
    "plot": "m2pt_cli.commands.sweep:plot",
    "recipes": "m2pt_cli.commands.recipes:recipes",
    "serve": "m2pt_cli.commands.serve:serve",
    "sweep": "m2pt_cli.commands.sweep:sweep",
    "train": "m2pt_cli.commands.train:train",
}


class UserFacingError(click.ClickException):
    """An error as m2pt shows it: one line on stderr, then the exit code (2 for bad input)."""

    def __init__(self, message: str, exit_code: int = 2, kind: str = "error") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind

    def show(self, file=None) -> None:
        """One printable line, however the message was built (``errors.one_line``): a value a file
        holds never reaches the terminal raw, nor breaks the one-line promise."""
        _close_progress_bars()
        click.echo(f"m2pt: {self.kind}: {one_line(self.format_message())}", err=True, file=file)


def _close_progress_bars() -> None:
    """End open tqdm bars so the error starts on a line of its own."""
    from m2pt_cli.hf_conventions import close_progress_bars

    close_progress_bars()


class LazyGroup(click.Group):
    """Imports a subcommand's module only when that subcommand runs or its help is shown."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr = SUBCOMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except UserError as exc:
            if debug:
                raise
            raise UserFacingError(str(exc), exc.exit_code, "stopped" if exc.exit_code == 130 else "error") from None
        except KeyboardInterrupt:
            raise UserFacingError("interrupted", 130, "stopped") from None
        except OSError as exc:
            if debug:
                raise
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                where = f" writing {exc.filename}" if exc.filename else ""
                raise UserFacingError(f"no space left{where} ({exc.strerror}); nothing partial was kept") from None
            if exc.errno == errno.ENAMETOOLONG:
                raise UserFacingError(_name_too_long(exc.filename)) from None
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and exc.filename:
                where = Path(exc.filename)
                where = where.parent if where.name.startswith(".") else where  # our temporary sibling
                fix = "; pass an output folder on a writable file system" if exc.errno == errno.EROFS else ""
                raise UserFacingError(f"{where}: {exc.strerror}{fix}") from None
            raise UserFacingError(f"{exc}", 1, "internal error") from None
        except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a one-line report
            if debug:
                raise
            message = f"{type(exc).__name__}: {first_lines(str(exc))} (rerun with --debug)"
            raise UserFacingError(message, 1, "internal error") from None


def _name_too_long(filename: object) -> str:
    """The one line for ``ENAMETOOLONG``: the path (cut short), its longest name and the limit."""
    path = Path(str(filename or ""))
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)), default="")
    limit = 255
    for folder in path.parents:  # the nearest folder that exists says what its file system allows
        try:
            limit = os.pathconf(folder, "PC_NAME_MAX")
            break
        except (OSError, ValueError):
            continue
    return (
        f"{quote(str(path)) if filename else 'a path'}: name too long for the file system "
        f"({len(os.fsencode(longest))} bytes in one name; the limit there is {limit}); pass a shorter one"
    )


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="m2pt")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """M²PT: multimodal prompt tuning for multimodal LLMs.

    Recipes (YAML files, or the bundled ones by name) choose the backbone, prompt lengths and
    layers; any recipe key can be overridden on the command line as KEY=VALUE.

    \b
    Examples:
      m2pt recipes
      m2pt info demo
      m2pt info llava prompts.text.length=20
      m2pt train demo
      m2pt train my-recipe.yaml
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="m2pt")
