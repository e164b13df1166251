"""The cache of converted GGUF files: one folder per file's SHA-256, written whole or not at all,
and used only when its content is what m2pt wrote.

Each folder holds a manifest (``m2pt_gguf.json``) naming the GGUF file's SHA-256 and every other
file with its size and SHA-256. A folder is used only when it is a real folder (not a link) that
holds exactly those files, each matching; anything else (a planted folder, a pickle beside the
weights, a file cut short by a crash) is not read but rebuilt. A manifest may list only what a
conversion writes (JSON, Jinja, text, sentencepiece and safetensors files), so even a consistent
planted entry cannot hand transformers a pickle. A new folder is built under a
temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "m2pt_gguf.json"
MAX_MANIFEST = 1 << 20
# What a conversion writes: config, tokenizer and template files, safetensors weights; never a pickle.
SUFFIXES = (".json", ".jinja", ".safetensors", ".txt", ".model")

log = logging.getLogger("m2pt")


def _digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST:
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    return manifest


def usable(target: Path, digest: str) -> bool:
    """Whether ``target`` is a whole, unaltered conversion of the GGUF file whose SHA-256 is
    ``digest``. A folder there that is not is logged and left to be rebuilt."""
    if not target.exists() and not target.is_symlink():
        return False
    why = _problem(target, digest)
    if why:
        log.warning("%s: %s; converting the GGUF file again", target, why)
    return not why


def _problem(target: Path, digest: str) -> str:
    if target.is_symlink() or not target.is_dir():
        return "not a folder m2pt wrote (a link or a file)"
    manifest = _read_manifest(target)
    if manifest is None or manifest.get("source_sha256") != digest:
        return f"no valid {MANIFEST} for this GGUF file"
    files = manifest["files"]
    odd = sorted(name for name in files if not name.endswith(SUFFIXES) or "/" in name or name.startswith("."))
    if odd:
        return f"its manifest lists {odd[0]!r}, which a conversion never writes"
    present = {entry.name for entry in target.iterdir()} - {MANIFEST}
    if present != set(files):
        extra = sorted(present - set(files)) or sorted(set(files) - present)
        return (
            f"holds {extra[0]!r}, which its manifest does not list" if present - set(files) else f"lacks {extra[0]!r}"
        )
    for name, record in sorted(files.items()):
        path = target / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size != record.get("size"):
            return f"{name} is not the file that was written (size)"
        if _digest(path) != record.get("sha256"):
            return f"{name} is not the file that was written (SHA-256)"
    return ""


@contextmanager
def building(target: Path, digest: str) -> Iterator[Path]:
    """A new empty folder to convert into; when the block ends it gets a manifest and becomes
    ``target`` whole (replacing a folder there that is not usable). Removed if the block raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield work
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _digest(p)} for p in sorted(work.iterdir()) if p.is_file()
        }
        manifest = {"source_sha256": digest, "files": files}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        _install(work, target, digest)
    finally:
        if work.exists():
            shutil.rmtree(work)


def _install(work: Path, target: Path, digest: str) -> None:
    """Rename ``work`` to ``target``; what was there is moved aside first and then removed."""
    if target.exists() or target.is_symlink():
        if usable(target, digest):  # another process (a DDP rank) finished the same conversion first
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
        os.replace(target, stale / "old")
        _remove(stale)
    try:
        os.rename(work, target)
    except OSError:
        if not usable(target, digest):
            raise


def _remove(folder: Path) -> None:
    old = folder / "old"
    if old.is_symlink() or old.is_file():
        old.unlink()
    shutil.rmtree(folder)
