"""Where a base model may come from: one rule for every command.

A base (``model.name_or_path``, and the model paths a backbone declares, such as an open_clip
tower) is

- a hub id;
- a folder or file the person running m2pt named: on the command line (``--base-model``,
  ``eval --recipe``, ``base=`` in Python) or in a recipe of their own;
- ``package:NAME/FILE``: a file strictly inside the installed Python package ``NAME`` (``FILE``
  relative, without ``..``, and still inside the package once links are resolved).

What an adapter or its run folder carries is none of these: a recipe that came with an adapter
may not name a base inside the adapter, its run folder, or by a path relative to itself, unless
the user names that base. The package rule holds whoever writes the spec.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path, PurePosixPath

from m2pt_cli.errors import UserError, quote

PACKAGE_PREFIX = "package:"
KEY = "model.name_or_path"
NAME_IT = (
    "an adapter does not bring its own base model: name the base yourself (generate --base-model, "
    "eval --recipe, or base= in Python) if you trust it"
)


def package_file(spec: str, key: str = KEY) -> Path:
    """The file ``package:NAME/FILE`` names, resolved, once it lies strictly inside the installed
    package ``NAME`` (located, never imported).

    Raises:
        UserError: not of that form, ``NAME`` not installed, ``FILE`` absolute or holding ``..``,
            or a link inside the package that leads out of it.
    """
    package, _, inner = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        found = importlib.util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations or not inner:
        raise UserError(
            f"{key}: {quote(spec)} must be package:NAME/FILE with NAME an installed Python package "
            f"({quote(package)} is not installed here)"
        )
    parts = PurePosixPath(inner).parts
    if inner.startswith(("/", "~")) or "\\" in inner or "\0" in inner or ".." in parts or not parts:
        raise UserError(
            f"{key}: {quote(spec)}: FILE must be a relative path inside the package, without '..' or an absolute part"
        )
    root = Path(next(iter(found.submodule_search_locations))).resolve()
    path = root.joinpath(*parts).resolve()
    if root not in path.parents:
        raise UserError(f"{key}: {quote(spec)} leads out of the package {package} (through a link); refused")
    return path


def carriers(recipe_file: Path, adapter: Path | None) -> list[Path]:
    """The folders an adapter's recipe travels with: its own folder, the adapter folder, and the run
    folder (one holding ``config.yaml``) around a run's ``adapter/`` or ``checkpoint-N/`` (each as
    written and resolved)."""
    folders = [Path(os.path.abspath(recipe_file)).parent, Path(recipe_file).resolve().parent]
    if adapter is not None:
        folders += [Path(os.path.abspath(adapter)), Path(adapter).resolve()]
    for folder in list(folders):
        parent = folder.parent
        if (parent / "config.yaml").is_file() and (
            parent / "adapter" == folder or folder.name.startswith("checkpoint-")
        ):
            folders.append(parent)
    return folders


def check_carried(paths: dict[str, str], written: dict[str, str], recipe_file: Path, adapter: Path | None) -> None:
    """Refuse a base that an adapter's recipe takes from what the adapter carries.

    Args:
        paths: key -> value of the recipe's model paths as loaded (relative ones anchored).
        written: key -> value as the file wrote them (to see ``./`` and ``../``).
        recipe_file: the recipe that came with the adapter.
        adapter: the adapter folder, if known.
    """
    homes = carriers(recipe_file, adapter)
    for key, value in paths.items():
        if not isinstance(value, str) or not value:
            continue
        raw = written.get(key, value)
        if isinstance(raw, str) and raw.startswith(("./", "../")):
            raise UserError(f"model.{key}: {quote(raw)} is a path relative to the adapter's recipe; {NAME_IT}")
        if value.startswith(PACKAGE_PREFIX):
            places = [package_file(value, f"model.{key}")]
        elif value.startswith(("/", "~")) or Path(value).exists():
            written_path = Path(os.path.abspath(Path(value).expanduser()))  # a link inside the adapter counts
            places = [written_path, written_path.resolve()]
        else:
            continue  # a hub id
        if any(where == home or home in where.parents for where in places for home in homes):
            raise UserError(f"model.{key}: {quote(value)} is inside the adapter folder or its run folder; {NAME_IT}")
