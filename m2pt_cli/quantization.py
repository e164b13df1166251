"""A quantized frozen base (``model.quantization: 8bit | 4bit``) through transformers' bitsandbytes
integration.

M²PT trains nothing of the base, so its linear layers can be stored in 8 or 4 bits; the prompts and
every module the recipe trains (``trainable``: the projector, ...) stay in full precision. Which
modules stay is decided here, from the model built on the meta device, and checked again after
loading: a trained module that came back quantized is an error, never a silent no-op.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from packaging.version import Version
from torch import nn

from m2pt_cli.config import QUANTIZATION_MODES
from m2pt_cli.errors import UserError

MODES = QUANTIZATION_MODES
#: Bits per stored weight; beside them bitsandbytes keeps float32 scales (8-bit: one per output
#: row; 4-bit NF4: one per block of ``BLOCK_4BIT`` weights).
BITS = {"8bit": 8, "4bit": 4}
BLOCK_4BIT = 64
#: Device types bitsandbytes 0.50 runs 8-bit and 4-bit layers on.
DEVICE_TYPES = ("cpu", "cuda")
#: The first bitsandbytes with 8-bit and 4-bit layers on CPU as well as CUDA (pyproject's extra).
MIN_BITSANDBYTES = "0.50"

_keep: ContextVar[tuple[str, ...]] = ContextVar("m2pt_full_precision", default=())


def require(mode: str, device: str, key: str = "model.quantization") -> None:
    """Refuse ``mode`` where it cannot run: bitsandbytes missing, or a device it does not support."""
    if mode == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{key}: {mode} needs the bitsandbytes package: pip install 'm2pt[quantization]'")
    installed = _bitsandbytes_version()
    if installed is not None and Version(installed) < Version(MIN_BITSANDBYTES):
        raise UserError(
            f"{key}: {mode} needs bitsandbytes >= {MIN_BITSANDBYTES} (installed: {installed}; older releases "
            "have no CPU layers and fail after loading): pip install -U 'm2pt[quantization]'"
        )
    kind = torch.device(device).type
    if kind not in DEVICE_TYPES:
        raise UserError(f"{key}: {mode} runs on {' or '.join(DEVICE_TYPES)} (bitsandbytes), not on {device!r}")


def _bitsandbytes_version() -> str | None:
    """The installed bitsandbytes' version from its metadata (importing it is slow), None if unknown."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


@contextmanager
def keeping(names: Sequence[str]) -> Iterator[None]:
    """Within the block, a quantized load keeps the modules ``names`` (qualified) in full precision."""
    token = _keep.set(tuple(names))
    try:
        yield
    finally:
        _keep.reset(token)


def _roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers models inside ``model`` (with their qualified names): what
    ``from_pretrained`` loads, and so what its quantization reaches (open_clip towers it does not)."""
    from transformers import PreTrainedModel

    roots: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name == r or name.startswith(r + ".") if r else True for r, _ in roots)
        if isinstance(module, PreTrainedModel) and not inside:
            roots.append((name, module))
    return roots


def _relative(name: str, root: str) -> str | None:
    if not root:
        return name
    return name[len(root) + 1 :] if name.startswith(root + ".") else None


def full_precision_names(model: nn.Module, modules: Sequence[nn.Module | nn.Parameter]) -> list[str]:
    """What a quantized load keeps in full precision: ``modules`` (the trained ones) and each
    transformers model's output layer, named inside that model (as ``from_pretrained`` sees it).
    A module that is a whole transformers model has no such name (``refuse_whole_models``)."""
    named = {id(module): name for name, module in model.named_modules()}
    named.update({id(param): name.rpartition(".")[0] for name, param in model.named_parameters()})
    keep: set[str] = set()
    for root, loaded in _roots(model):
        output = loaded.get_output_embeddings()
        for module in [*modules, *([output] if output is not None else [])]:
            relative = _relative(named.get(id(module), ""), root)
            if relative:
                keep.add(relative)
    return sorted(keep)


def _trained_quantized(name: str, mode: str) -> UserError:
    return UserError(
        f"model.quantization: trainable module {name!r} would be quantized ({mode} applies to the "
        "frozen base); train it on model.quantization: none"
    )


def refuse_whole_models(model: nn.Module, trained: dict[str, nn.Module | nn.Parameter], mode: str) -> None:
    """Refuse, before any weights are read, a trained module that is a whole transformers model
    (``method: full`` on openclip_vicuna trains its whole LLM): nothing of it could stay in full precision."""
    roots = [loaded for _, loaded in _roots(model)]
    for name, module in trained.items():
        if any(module is loaded for loaded in roots):
            raise _trained_quantized(name, mode)


def quantized_linears(model: nn.Module, keep: Sequence[str]) -> list[nn.Linear]:
    """The linear layers of ``model`` that a quantized load stores in low precision: those inside a
    transformers model, outside ``keep`` (``full_precision_names``)."""
    found = []
    for _, loaded in _roots(model):
        for name, module in loaded.named_modules():
            kept = any(name == k or name.startswith(k + ".") for k in keep)
            if isinstance(module, nn.Linear) and not kept:
                found.append(module)
    return found


def hf_config(mode: str, dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of ``mode`` (None for ``none``), keeping what ``keeping`` names."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    keep = [re.escape(name) for name in _keep.get()] or None
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=keep
    )


def is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` is stored by bitsandbytes (8-bit ``Int8Params`` or 4-bit ``Params4bit``)."""
    return type(param).__name__ in ("Int8Params", "Params4bit")


def prepare(base: nn.Module, mode: str, trained: dict[str, nn.Module | nn.Parameter], backbone: str) -> None:
    """After loading: check that something was quantized and nothing that trains was, and keep
    bitsandbytes' 4-bit layers on their training path.

    bitsandbytes 0.50 repacks a 4-bit weight for an AVX512-BF16 inference kernel the first time it
    runs on a CPU in eval mode without gradients (m2pt's held-out accuracy does) and never unpacks
    it, after which gradients to the layer's input fail ("a view of a leaf Variable ... in-place").
    M²PT back-propagates through every frozen layer, so that repacking is switched off.
    """
    if mode == "none":
        return
    if not any(is_quantized(p) for p in base.parameters()):
        raise UserError(f"model.quantization: backbone {backbone!r} does not load quantized weights; use none")
    for name, module in trained.items():
        params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
        if any(is_quantized(p) for p in params):
            raise _trained_quantized(name, mode)
    for module in base.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def weight_bytes(model: nn.Module, mode: str, keep: Sequence[str]) -> int:
    """Bytes the weights of ``model`` (built on the meta device in the recipe's dtype) take when
    loaded in ``mode``: each of ``quantized_linears`` in ``BITS[mode]`` bits plus its float32
    scales, every other tensor as built."""
    quantized: set[int] = set()
    total = 0
    if mode != "none":
        for module in quantized_linears(model, keep):
            weight = module.weight
            quantized.add(id(weight))
            scales = weight.shape[0] if mode == "8bit" else -(-weight.numel() // BLOCK_4BIT)
            total += weight.numel() * BITS[mode] // 8 + 4 * scales
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in quantized and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
