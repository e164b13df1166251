"""Continuing earlier work only when it is the same work: identities and their first difference.

A command that continues what an earlier one left (``eval --resume``, ``sweep --resume``) records
an identity with its outputs (a JSON-able dict of everything that changes an answer or a score)
and, before writing anything, compares it with what it is about to do. Any difference stops the
command with one line naming it and the way out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m2pt_cli.errors import UserError
from m2pt_cli.reading import read_json

MISSING = object()


def _show(value: Any) -> str:
    if value is MISSING:
        return "absent"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def first_difference(old: Any, new: Any, key: str = "") -> str | None:
    """``"KEY was OLD, now NEW"`` for the first (sorted, depth-first) key whose values differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            found = first_difference(old.get(name, MISSING), new.get(name, MISSING), f"{key}.{name}" if key else name)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and old != new:
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            found = first_difference(a, b, f"{key}[{i}]")
            if found:
                return found
        change = f"new: {_show(new[len(old)])}" if len(new) > len(old) else f"gone: {_show(old[len(new)])}"
        return f"{key} had {len(old)} items, now {len(new)} ({change})"
    if old == new:
        return None
    return f"{key or 'identity'} was {_show(old)}, now {_show(new)}"


def check_same(where: str, what: str, old: Any, new: Any, way_out: str) -> None:
    """Raise a one-line ``UserError`` if ``old`` (recorded at ``where``) differs from ``new``.

    Args:
        what: the kind of work, e.g. ``"evaluation"``.
        way_out: what the user can do instead, e.g. ``"pass --output-dir elsewhere or --overwrite"``.
    """
    difference = first_difference(old, new)
    if difference:
        raise UserError(f"{where} belongs to another {what} ({difference}); {way_out}")


def read_record(path: Path, way_out: str) -> dict[str, Any]:
    """The JSON object an earlier command recorded at ``path``; a damaged one is a one-line error."""
    try:
        value = read_json(Path(path), "record")
    except UserError as exc:
        raise UserError(f"{exc}; {way_out}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object; {way_out}")
    return value
