"""The recipe reference: every key with its type, default, allowed values and help, read from the
dataclasses that check recipes (``config``), so the documentation cannot drift from the schema.

``docs/recipe-reference.md`` is this module's Markdown (a test regenerates and compares it);
``m2pt info --keys`` prints the same keys in the terminal, plugins' backbones included.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from m2pt_cli import config

GENERATED_BY = "python -m m2pt_cli.recipe_reference > docs/recipe-reference.md"


@dataclass(frozen=True)
class KeyDoc:
    """One recipe key as the reference shows it."""

    path: str
    type: str
    default: str
    choices: str
    help: str


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip() or "''"


def _nested(tp: Any) -> tuple[type | None, str]:
    """(the dataclass a field holds, the path suffix: ``""`` or ``"[]"`` for a list of them)."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0], "[]"
    return None, ""


def keys_of(cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[KeyDoc]:
    """Every leaf key of the dataclass ``cls`` under ``prefix``, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        path = f"{prefix}{f.name}"
        inner, suffix = _nested(hints[f.name])
        if inner is not None and inner is not config.ModelCfg:
            docs += keys_of(inner, f"{path}{suffix}.")
            continue
        if inner is config.ModelCfg:
            docs += keys_of(config.ModelCfg, f"{path}.")
            continue
        choices = f.metadata.get("choices") or ()
        docs.append(
            KeyDoc(
                path=path,
                type=config.type_name(hints[f.name]),
                default=_default_text(f),
                choices=", ".join(map(str, choices)),
                help=f.metadata.get("help", ""),
            )
        )
    return docs


def backbone_keys(backbone: str) -> list[KeyDoc]:
    """The ``model`` keys ``backbone`` reads besides the common ones."""
    return keys_of(config.model_class(backbone), "model.", skip=config.COMMON_MODEL_KEYS)


def reference(backbones: list[str]) -> dict[str, list[KeyDoc]]:
    """Section title -> keys: the whole recipe, then each backbone's own ``model`` keys."""
    sections = {"recipe": keys_of(config.Recipe)}
    for backbone in backbones:
        own = backbone_keys(backbone)
        if own:
            sections[f"backbone {backbone}"] = own
    return sections


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(backbones: list[str]) -> str:
    """The reference as ``docs/recipe-reference.md``."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from the recipe schema (`m2pt_cli/config.py`) by",
        f"`{GENERATED_BY}`; do not edit by hand (a test",
        "compares this file with what the schema generates). `m2pt info --keys` prints the same in the",
        "terminal, with the backbones of installed plugins. Any key can be overridden on the command line",
        "as `KEY=VALUE` (`data.sources[0].limit=100`, `prompts.vision.layers=0-11`).",
    ]
    for title, docs in reference(backbones).items():
        lines += ["", f"## {title}", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        lines += [
            f"| `{d.path}` | {_cell(d.type)} | `{_cell(d.default)}` | {_cell(d.choices)} | {_cell(d.help)} |"
            for d in docs
        ]
    return "\n".join(lines) + "\n"


def terminal(backbones: list[str]) -> str:
    """The reference as plain text for ``m2pt info --keys``."""
    lines: list[str] = []
    for title, docs in reference(backbones).items():
        lines += [f"{title}:"]
        for d in docs:
            allowed = f"; one of {d.choices}" if d.choices else ""
            lines.append(f"  {d.path} ({d.type}, default {d.default}{allowed})")
            lines.append(f"      {d.help}")
    return "\n".join(lines)


def built_in_backbones() -> list[str]:
    """The backbones m2pt ships (the committed reference leaves installed plugins out)."""
    from m2pt_cli.registry import BACKBONES

    return [name for name in BACKBONES.names() if BACKBONES.origin(name) == "m2pt"]


if __name__ == "__main__":
    print(markdown(built_in_backbones()), end="")
