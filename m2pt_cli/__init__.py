"""m2pt: Multimodal Prompt Tuning (M²PT) for multimodal LLMs, as a CLI and a Python API."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(source, adapter=None, device="cpu", dtype=None, overrides=(), base=None, trust_remote_code=False):
    """Load a model with M²PT attached: ``(model, processor)``.

    ``source`` is a recipe file or an adapter folder (exported, run, or checkpoint); ``base``
    points at other base weights; ``trust_remote_code=True`` lets the model run code from its
    repository (a recipe cannot). See ``m2pt_cli.loading.load``; torch is imported lazily.
    """
    from m2pt_cli.loading import load as _load

    return _load(
        source,
        adapter=adapter,
        device=device,
        dtype=dtype,
        overrides=overrides,
        base=base,
        trust_remote_code=trust_remote_code,
    )
