"""m2pt: Multimodal Prompt Tuning (M²PT) for multimodal LLMs, as a CLI and a Python API."""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _not_trust_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Skipping publisher trust check for ")


# Two bitsandbytes messages that are not the user's to act on, silenced before anything imports it
# (peft does whenever it is installed): on CPUs with AVX512-BF16 its import offers a hub kernel
# (the ``kernels`` package) that m2pt never downloads, and every 8-bit matmul says that float32
# inputs are cast to float16, which is how its 8-bit layers work (``model.quantization: 8bit``).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_notice)
# The same import, offline (HF_HUB_OFFLINE, as on a cluster node), makes the ``kernels`` package say
# "Skipping publisher trust check for 'kernels-community/...'" for that hub kernel on every train and
# sweep (#37): a line about a kernel m2pt never asked for, which broke the one-line error promise.
logging.getLogger("kernels._internals.hf_hub").addFilter(_not_trust_notice)


def load(source, adapter=None, device="cpu", dtype=None, overrides=(), base=None, trust_remote_code=False):
    """Load a model with M²PT attached: ``(model, processor)``.

    ``source`` is a recipe file or an adapter folder (exported, run, or checkpoint); ``base``
    points at other base weights; ``trust_remote_code=True`` lets the model run code from its
    repository (a recipe cannot). See ``m2pt_cli.model_source.load``; torch is imported lazily.
    """
    from m2pt_cli.model_source import load as _load

    return _load(
        source,
        adapter=adapter,
        device=device,
        dtype=dtype,
        overrides=overrides,
        base=base,
        trust_remote_code=trust_remote_code,
    )
