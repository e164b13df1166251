"""Padding a batch order costs: tokens per batch up to its longest sample, summed."""

from __future__ import annotations

from typing import Any

import numpy as np


def lengths_of(dataset: Any) -> np.ndarray:
    """Tokens per sample of an encoded dataset, read from the Arrow offsets (no row is decoded)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    indices = dataset._indices  # a split or a mix selects rows through an index table; the data stays as stored
    if indices is not None:
        lengths = lengths[indices.column(0).to_numpy(zero_copy_only=False)]
    return lengths


def padding_of(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Pad tokens when ``lengths`` are batched ``batch_size`` at a time in ``order``."""
    padded = 0
    for start in range(0, len(order), batch_size):
        chunk = lengths[order[start : start + batch_size]]
        padded += int(chunk.max()) * len(chunk) - int(chunk.sum())
    return padded


def padded_tokens(dataset: Any, batch_size: int, seed: int) -> dict[str, int]:
    """Tokens and pad tokens of one epoch in a random order (as the Trainer shuffles)."""
    lengths = lengths_of(dataset)
    order = np.random.default_rng(seed).permutation(len(lengths))
    return {"tokens": int(lengths.sum()), "padding": padding_of(lengths, order, batch_size)}
