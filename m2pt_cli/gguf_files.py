"""An LLM given as one GGUF file: converted once into a cached Hugging Face folder that every
backbone and command reads like any other checkpoint.

``model.name_or_path`` names the file by its path (``./smol.gguf``) or inside an installed Python
package, ``package:NAME/FILE`` (the package is located, never imported). transformers reads GGUF
through the ``gguf`` package and dequantizes it to float32; the folder is keyed by the file's
SHA-256, so a changed file is converted again and an unchanged one never is.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from m2pt_cli.errors import UserError, first_line, quote

PACKAGE_PREFIX = "package:"
MAGIC = b"GGUF"
KEY = "model.name_or_path"


def is_gguf(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a GGUF file rather than a hub id or a folder."""
    return name_or_path.startswith(PACKAGE_PREFIX) or name_or_path.lower().endswith(".gguf")


def locate(name_or_path: str) -> Path:
    """The GGUF file that ``name_or_path`` names, checked to exist and to be GGUF.

    Raises:
        UserError: no such package or file, or the file is not GGUF.
    """
    if name_or_path.startswith(PACKAGE_PREFIX):
        package, _, inner = name_or_path.removeprefix(PACKAGE_PREFIX).partition("/")
        try:
            spec = importlib.util.find_spec(package) if package.isidentifier() else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations or not inner:
            raise UserError(
                f"{KEY}: {quote(name_or_path)} must be package:NAME/FILE with NAME an installed Python package "
                f"({quote(package)} is not installed here)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(f"{KEY}: {quote(name_or_path)} is not a file")
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise UserError(f"{KEY}: {path} is not a GGUF file (it does not start with {MAGIC.decode()})")
    return path


def cache_root() -> Path:
    """Where converted folders live: ``$M2PT_CACHE/gguf``, or ``~/.cache/m2pt/gguf``."""
    named = os.environ.get("M2PT_CACHE")
    base = Path(named or Path.home() / ".cache" / "m2pt").expanduser()
    for folder in (base, base / "gguf"):
        if folder.exists() and not folder.is_dir():
            where = "$M2PT_CACHE" if named else "the cache"
            raise UserError(
                f"{where} {quote(str(folder))}: exists and is not a folder; point $M2PT_CACHE at a folder "
                "(m2pt keeps converted GGUF models there)"
            )
    return base / "gguf"


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The file's SHA-256, read once per process for a given size and modification time (a load
    resolves the model source more than once)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hf_folder(name_or_path: str) -> Path:
    """The Hugging Face folder (config, safetensors weights, tokenizer with its chat template) of the
    GGUF file ``name_or_path`` names, converting it on first use.

    Raises:
        UserError: the file is missing or not GGUF, the ``gguf`` package is not installed, or
            transformers cannot read the file's architecture.
    """
    path = locate(name_or_path)
    stat = path.stat()
    target = cache_root() / f"{path.stem}-{_sha256(path, stat.st_size, stat.st_mtime_ns)[:16]}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401 (transformers reads GGUF through it)
    except ImportError:
        raise UserError(f"{KEY}: reading {path.name} needs the gguf package: pip install 'm2pt[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("m2pt").info("converting %s to a Hugging Face folder once: %s", path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # unsupported architecture, damaged file
            raise UserError(f"{KEY}: transformers cannot read {path} ({first_line(exc)})") from None
        _save_float_checkpoint(model, work)
        tokenizer.save_pretrained(work)
        try:
            work.rename(target)
        except OSError:  # another process (a DDP rank) finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work)
    return target


def _save_float_checkpoint(model, folder: Path) -> None:
    """The dequantized model as a plain checkpoint (transformers refuses to ``save_pretrained`` a model
    it loaded from GGUF): config without the GGUF marking, generation config, safetensors weights
    (tied embeddings stored once)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
