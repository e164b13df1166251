"""The ``m2pt`` command: a click group whose subcommands load lazily (``m2pt --help`` imports no torch)."""

from __future__ import annotations

import importlib

import click

from m2pt_cli import __version__
from m2pt_cli.errors import UserError

# name -> "module:command"; each module imports torch only inside its command.
SUBCOMMANDS = {
    "bench": "m2pt_cli.commands.bench:bench",
    "eval": "m2pt_cli.commands.eval:eval_command",
    "export": "m2pt_cli.commands.export:export",
    "generate": "m2pt_cli.commands.generate:generate",
    "info": "m2pt_cli.commands.info:info",
    "recipes": "m2pt_cli.commands.recipes:recipes",
    "train": "m2pt_cli.commands.train:train",
}


class UserFacingError(click.ClickException):
    """A ``UserError`` as click shows it: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"m2pt: error: {self.format_message()}", err=True, file=file)


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
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise UserFacingError(str(exc)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="m2pt")
def cli() -> None:
    """M²PT: multimodal prompt tuning for multimodal LLMs.

    Recipes (YAML) choose the backbone, prompt lengths and layers; any recipe key can be
    overridden on the command line as KEY=VALUE.

    \b
    Examples:
      m2pt recipes
      m2pt info recipes/demo.yaml
      m2pt info recipes/llava.yaml prompts.text.length=20
      m2pt train recipes/demo.yaml
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="m2pt")
