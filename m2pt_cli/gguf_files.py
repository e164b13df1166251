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
import logging
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from m2pt_cli import base_origin, gguf_header, hf_conventions, jinja_bounds
from m2pt_cli.cache_folders import cache_folder
from m2pt_cli.errors import UserError, first_line, quote

PACKAGE_PREFIX = base_origin.PACKAGE_PREFIX
MAGIC = b"GGUF"
KEY = "model.name_or_path"


def is_gguf(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a GGUF file rather than a hub id or a folder."""
    return name_or_path.startswith(PACKAGE_PREFIX) or name_or_path.lower().endswith(".gguf")


def locate(name_or_path: str) -> Path:
    """The GGUF file that ``name_or_path`` names, checked to exist and to be GGUF.

    Raises:
        UserError: no such package or file, a package file outside its package
            (:func:`m2pt_cli.base_origin.package_file`), or the file is not GGUF.
    """
    if name_or_path.startswith(PACKAGE_PREFIX):
        path = base_origin.package_file(name_or_path)
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
    return cache_folder("gguf", "converted GGUF models")


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The file's SHA-256, read once per process for a given size and modification time (a load
    resolves the model source more than once)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: Path) -> str:
    """``path``'s SHA-256 (remembered per size and modification time)."""
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def hf_folder(name_or_path: str) -> Path:
    """The Hugging Face folder (config, safetensors weights, tokenizer with its chat template) of the
    GGUF file ``name_or_path`` names, converting it on first use.

    The header is checked first (:mod:`m2pt_cli.gguf_header`), then every parameter the metadata's
    architecture implies must be a tensor of the file with its shape (checked on a model built on the
    meta device), so a file that only claims a model is refused before anything is allocated or
    written. A cached folder is used only when its files match its manifest (:mod:`m2pt_cli.gguf_cache`).

    Raises:
        UserError: the file is missing, not GGUF, damaged or hostile; the ``gguf`` package is not
            installed; transformers cannot read the file's architecture.
    """
    from m2pt_cli import gguf_cache

    path = locate(name_or_path)
    try:
        import gguf  # noqa: F401 (transformers reads GGUF through it)
    except ImportError:
        raise UserError(f"{KEY}: reading {path.name} needs the gguf package: pip install 'm2pt[gguf]'") from None
    header = gguf_header.read_header(path, str(path))
    digest = file_sha256(path)
    target = cache_root() / f"{path.stem}-{digest[:16]}"
    if gguf_cache.usable(target, digest):
        return target
    config = check_tensors(path, header)
    check_chat_template(path, header)
    logging.getLogger("m2pt").info("converting %s to a Hugging Face folder once: %s", path, target)
    with gguf_cache.building(target, digest) as work:
        _convert(path, work, config)
    return target


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """What transformers raises on a file it cannot read, as one line."""
    try:
        yield
    except UserError:
        raise
    # RuntimeError covers RecursionError and NotImplementedError (an architecture gguf-py lacks)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError, struct.error) as exc:
        raise UserError(
            f"{KEY}: transformers cannot read {path} ({type(exc).__name__}: {quote(first_line(exc))})"
        ) from None
    except Exception as exc:  # noqa: BLE001 (the tokenizers library raises bare Exception on a bad vocabulary)
        if type(exc) is not Exception:
            raise
        raise UserError(f"{KEY}: transformers cannot read the tokenizer of {path} ({quote(first_line(exc))})") from None


def check_tensors(path: Path, header: gguf_header.Header):
    """Every parameter of the model the metadata describes is a tensor of the file with as many
    elements (built on the meta device: nothing is allocated); a missing or misshapen one is a
    one-line ``UserError``. Returns the model's config (the conversion loads with it, so the file's
    metadata is parsed once here instead of again there)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with _reading(path):
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = hf_conventions.gguf_weight_names(model, header.architecture, config.to_dict())
    source = {hf: gguf for gguf, hf in names.items() if gguf in header.tensors}
    for name, param in model.named_parameters():
        gguf = source.get(name)
        if gguf is None:
            raise UserError(
                f"{KEY}: {path} holds no tensor for {name} of the {header.architecture} model its metadata "
                "describes; m2pt does not fill weights at random"
            )
        dims = header.tensors[gguf].dims
        if math.prod(dims) != param.numel():
            raise UserError(
                f"{KEY}: {path}: tensor {gguf} has shape {list(reversed(dims))}, the {header.architecture} "
                f"model its metadata describes needs {list(param.shape)} for {name}"
            )
    return config


def check_chat_template(path: Path, header: gguf_header.Header) -> None:
    """The file's chat template compiles and renders a short conversation within
    :mod:`m2pt_cli.jinja_bounds`' bounds; a template that does not is a one-line ``UserError``."""
    from jinja2.exceptions import SecurityError, TemplateSyntaxError

    template = header.metadata.get(gguf_header.CHAT_TEMPLATE)
    if not isinstance(template, str):
        return
    try:
        jinja_bounds.probe(template)
    except (SecurityError, TemplateSyntaxError, RecursionError) as exc:
        raise UserError(
            f"{KEY}: {path}: {gguf_header.CHAT_TEMPLATE} refused ({type(exc).__name__}: {quote(first_line(exc))})"
        ) from None


def _convert(path: Path, work: Path, config) -> None:
    """Dequantize the file into ``work``: tokenizer, ``config`` and safetensors weights, every
    parameter read from the file (transformers' loading report must list none missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _reading(path):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model, info = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, output_loading_info=True
        )
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if missing:
        raise UserError(f"{KEY}: {path} does not hold {missing[0]}; m2pt does not fill weights at random")
    _save_float_checkpoint(model, work)
    tokenizer.save_pretrained(work)


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
