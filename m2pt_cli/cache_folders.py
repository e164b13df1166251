"""m2pt's own cache folders: ``$M2PT_CACHE/<kind>``, or ``~/.cache/m2pt/<kind>``."""

from __future__ import annotations

import os
from pathlib import Path

from m2pt_cli.errors import UserError, quote


def cache_folder(kind: str, holds: str) -> Path:
    """The folder for ``kind`` (``gguf``, ``data``); ``holds`` says what m2pt keeps there, for the
    one-line error when ``$M2PT_CACHE`` or the folder is a file."""
    named = os.environ.get("M2PT_CACHE")
    base = Path(named or Path.home() / ".cache" / "m2pt").expanduser()
    for folder in (base, base / kind):
        if folder.exists() and not folder.is_dir():
            where = "$M2PT_CACHE" if named else "the cache"
            raise UserError(
                f"{where} {quote(str(folder))}: exists and is not a folder; point $M2PT_CACHE at a folder "
                f"(m2pt keeps {holds} there)"
            )
    return base / kind
