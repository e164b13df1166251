"""m2pt: Multimodal Prompt Tuning (M²PT) for multimodal LLMs, as a CLI and a Python API."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(source, adapter=None, device="cpu", dtype=None, overrides=()):
    """Load a model with M²PT attached; see ``m2pt_cli.loading.load`` (imports torch lazily)."""
    from m2pt_cli.loading import load as _load

    return _load(source, adapter=adapter, device=device, dtype=dtype, overrides=overrides)
