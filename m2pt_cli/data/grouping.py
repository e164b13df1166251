"""Length-grouped training order (``data.group_by``), as LLaVA trains with ``group_by_modality_length``:
image and text-only records in separate megabatches (one optimizer step's samples), similar lengths
together within each, megabatches in a seeded random order. Built on transformers'
``get_length_grouped_indices``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from m2pt_cli.config import GROUP_BY


def _grouped(lengths: list[int], batch_size: int, mult: int, generator: torch.Generator) -> list[int]:
    """transformers' order: shuffled, cut into megabatches of ``mult`` batches, each sorted longest first."""
    return get_length_grouped_indices(lengths, batch_size, mega_batch_mult=mult, generator=generator) if lengths else []


def grouped_indices(
    lengths: Sequence[int],
    has_image: Sequence[bool],
    batch_size: int,
    mode: str,
    seed: int,
    megabatch_batches: int = 1,
) -> list[int]:
    """Every index of ``lengths`` once, in the order ``mode`` trains them (the same for a seed).

    ``none``: a seeded shuffle. ``length``: transformers' grouping, megabatches of
    ``batch_size * megabatch_batches``. ``modality_length``: that grouping within image and text-only
    records apart; the full megabatches of both shuffled together, then the two leftovers (images,
    then text), so only the last batches can mix modalities."""
    if mode not in GROUP_BY:
        raise ValueError(f"group_by {mode!r}: expected one of {GROUP_BY}")
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in lengths]
    if mode == "none":
        return torch.randperm(len(lengths), generator=generator).tolist()
    if mode == "length":
        return _grouped(lengths, batch_size, megabatch_batches, generator)
    mega = batch_size * megabatch_batches
    megabatches: list[list[int]] = []
    rest: list[int] = []
    for modality in (True, False):
        group = [i for i, image in enumerate(has_image) if bool(image) == modality]
        order = [group[i] for i in _grouped([lengths[j] for j in group], batch_size, megabatch_batches, generator)]
        full = len(order) // mega * mega
        megabatches += [order[i : i + mega] for i in range(0, full, mega)]
        rest += sorted(order[full:], key=lambda i: -lengths[i])
    shuffled = torch.randperm(len(megabatches), generator=generator).tolist()
    return [i for k in shuffled for i in megabatches[k]] + rest


def padded_tokens(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> int:
    """Padding tokens the batches of ``order`` hold (each padded to its longest record)."""
    ordered = np.asarray(lengths, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    total = 0
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        total += int(batch.max()) * len(batch) - int(batch.sum())
    return total


def padding_saved(
    lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, mode: str, seed: int, megabatch_batches: int = 1
) -> tuple[int, int]:
    """(padding tokens in a shuffled order, in the ``mode`` order) for batches of ``batch_size``
    (``m2pt data`` reports the difference: per-device batches, megabatches of one optimizer step
    with ``megabatch_batches`` = global batch / per-device batch)."""
    shuffled = grouped_indices(lengths, has_image, batch_size, "none", seed)
    grouped = grouped_indices(lengths, has_image, batch_size, mode, seed, megabatch_batches)
    return padded_tokens(lengths, shuffled, batch_size), padded_tokens(lengths, grouped, batch_size)


def lengths_and_images(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per record (``input_ids``) and whether it has an image, read from the stored Arrow
    columns (list offsets and validity bits only: no row is copied or decoded), in the data set's
    row order (through its index table when a split or a mix selected rows)."""
    import pyarrow.compute as pc

    if len(dataset) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    table = dataset.data
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
    images = pc.is_valid(table.column("image")).to_numpy(zero_copy_only=False).astype(bool)
    indices = dataset._indices  # datasets' index table (public API has none): rows as selected
    if indices is not None:
        rows = indices.column(0).to_numpy()
        lengths, images = lengths[rows], images[rows]
    return lengths, images


class GroupedSampler(Sampler[int]):
    """The training order of ``grouped_indices`` for the Trainer: one index list over the whole data
    set, which accelerate cuts into per-device batches and deals out to the processes in turn (so a
    megabatch of ``batch_size x processes x accumulation`` is one optimizer step). Seeded by the
    Trainer's seed and the epoch (``set_epoch``), so every process and a resumed run get the same order."""

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool],
        batch_size: int,
        megabatch_batches: int,
        mode: str,
        seed: int,
    ) -> None:
        self.lengths, self.has_image = lengths, has_image
        self.batch_size, self.megabatch_batches = batch_size, megabatch_batches
        self.mode, self.seed, self.epoch = mode, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(
            grouped_indices(
                self.lengths,
                self.has_image,
                self.batch_size,
                self.mode,
                self.seed + self.epoch,
                self.megabatch_batches,
            )
        )
