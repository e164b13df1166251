"""What ``m2pt export`` checks of an adapter before it hashes it (issue #36).

Hashing reads every byte of ``adapter.safetensors``, so a file whose header honestly declares a
terabyte would keep export busy for an hour. Before that, from the header and the metadata alone:

1. the prompt tensors have the shape the adapter's own ``m2pt_config`` says (layers x length x width);
2. the tensors declare at most ``max_bytes`` in all (``--max-adapter-bytes``, default
   ``MAX_ADAPTER_BYTES``);
3. where the base its recipe names can be read here without a download (a local model folder, or a
   hub id in the local cache), ``loading.check_adapter`` compares the tensors with that base built
   on the meta device, as loading does. Otherwise one log line says why that check was skipped and
   the file is hashed with a progress bar.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from m2pt_cli import adapter as adapter_files
from m2pt_cli import config as recipe_config
from m2pt_cli import gguf_files, loading
from m2pt_cli.config import Recipe
from m2pt_cli.errors import UserError, quote

log = logging.getLogger("m2pt")

GiB = 1 << 30
# m2pt and LoRA adapters hold MBs to hundreds of MBs; method=full trains the whole language model:
# a 7B base is ~14 GB in bfloat16, ~28 GB in float32. Hashing 32 GiB takes about a minute.
MAX_ADAPTER_BYTES = 32 * GiB


def check(
    folder: Path,
    meta: dict[str, Any],
    header: dict[str, tuple[tuple[int, ...], int]],
    max_bytes: int,
    recipe: Recipe,
    recipe_file: Path,
    raw: dict[str, Any],
) -> bool:
    """Run the checks above on an adapter's metadata and header (``adapter.read_header``), its
    recipe already read; return whether the base comparison was skipped (then the file is hashed
    with a progress bar)."""
    check_prompts(folder, meta, {name: shape for name, (shape, _) in header.items()})
    declared = sum(nbytes for _, nbytes in header.values())
    if declared > max_bytes:
        raise UserError(
            f"{folder / adapter_files.WEIGHTS}: declares {declared:,} bytes of tensors, over "
            f"--max-adapter-bytes ({max_bytes:,}); raise it if you expect an adapter that big"
        )
    shapes = {name: shape for name, (shape, _) in header.items()}
    skipped = check_base(folder, meta, recipe, recipe_file, raw, shapes)
    if skipped:
        log.info("%s: not compared with its base (%s); hashing it whole", folder, skipped)
    return skipped is not None


def check_prompts(folder: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse prompt tensors whose shapes are not what the adapter's own ``m2pt_config`` says."""
    config = meta.get("m2pt_config")
    config = config if isinstance(config, dict) else {}
    for tower in ("vision", "text"):
        layers, length, width = (config.get(f"{tower}_{key}") for key in ("layers", "length", "width"))
        counts_ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (length, width))
        if not (isinstance(layers, list) and all(isinstance(n, int) for n in layers) and counts_ok):
            raise UserError(
                f"{folder / adapter_files.CONFIG}: m2pt_config needs {tower}_layers (a list of layer numbers), "
                f"{tower}_length and {tower}_width (whole numbers); found {quote([layers, length, width])}"
            )
        want = (len(layers), length, width)
        held = shapes.get(f"{tower}_prompts")
        if (held is None and 0 not in want) or (held is not None and tuple(held) != want):
            what = f"holds {tower}_prompts of shape {tuple(held)}" if held is not None else f"holds no {tower}_prompts"
            raise UserError(
                f"{folder / adapter_files.WEIGHTS}: {what}; its {adapter_files.CONFIG} says {want} "
                f"({tower} layers x length x width)"
            )


def check_base(
    folder: Path,
    meta: dict[str, Any],
    recipe: Recipe | None = None,
    recipe_file: Path | None = None,
    raw: dict[str, Any] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> str | None:
    """Run ``loading.check_adapter`` against the base the adapter's recipe names when that base's
    config can be read here without downloading or running anything; else say why not. The
    recipe (its file and ``raw`` contents) and the tensor ``shapes`` are read here unless given."""
    if recipe is None or recipe_file is None:
        recipe_file = adapter_files.recipe_of(folder)
        raw = recipe_config.read_yaml(recipe_file)
        recipe = recipe_config.load(recipe_file, raw=raw)
    try:
        loading.check_own_base(recipe, recipe_file, folder, raw)
    except UserError:
        return "its recipe names a base the adapter carries, which cannot vouch for it"
    why = unreadable_base(recipe.model.name_or_path, recipe.model.revision)
    if why is None and recipe.model.trust_remote_code:
        why = "its base needs its own code, which export never runs"
    if why is None:
        with offline():
            loading.check_adapter(recipe, folder, meta, shapes)
    return why


def unreadable_base(name_or_path: str, revision: str | None) -> str | None:
    """Why the config of base ``name_or_path`` cannot be read here without a download, or None."""
    if gguf_files.is_gguf(name_or_path):
        return f"its base {quote(name_or_path)} is a GGUF file, which export does not convert"
    folder = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) or folder.exists():
        if (folder / "config.json").is_file():
            return None
        return f"its base folder {quote(name_or_path)} is not a model folder here"
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except ValueError:  # not a valid hub id (HFValidationError)
        cached = None
    if isinstance(cached, str):
        return None
    return f"its base {quote(name_or_path)} is not in the local hub cache, and export downloads nothing"


@contextmanager
def offline() -> Iterator[None]:
    """No hub request while the base is built on the meta device (as ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
