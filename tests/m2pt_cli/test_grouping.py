"""Length-grouped training order (data.group_by), checked by independent counting: every index once,
no batch mixing modalities before the leftovers, lengths sorted within megabatches, one order per seed."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from m2pt_cli.data.grouping import GroupedSampler, grouped_indices, lengths_and_images, padded_tokens, padding_saved
from tests.helpers import adapter, free_port, m2pt


def records(n: int, seed: int, image_share: float = 0.6) -> tuple[list[int], list[bool]]:
    rng = random.Random(seed)
    has_image = [rng.random() < image_share for _ in range(n)]
    lengths = [rng.randint(600, 700) if image else rng.randint(5, 400) for image in has_image]  # LLaVA-like
    return lengths, has_image


def reference_padding(lengths, order, batch_size) -> int:
    """Padding counted batch by batch, the plain way."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += sum(max(batch) - n for n in batch)
    return total


@pytest.mark.parametrize("mode", ["none", "length", "modality_length"])
@pytest.mark.parametrize(("n", "batch", "mult"), [(1000, 4, 8), (333, 3, 5), (7, 4, 2), (0, 4, 1)])
def test_every_index_exactly_once_and_one_order_per_seed(mode, n, batch, mult):
    lengths, images = records(n, seed=n)
    order = grouped_indices(lengths, images, batch, mode, seed=3, megabatch_batches=mult)
    assert sorted(order) == list(range(n))
    assert order == grouped_indices(lengths, images, batch, mode, seed=3, megabatch_batches=mult)
    if n > 100:
        assert order != grouped_indices(lengths, images, batch, mode, seed=4, megabatch_batches=mult)


@pytest.mark.parametrize(("n", "batch", "mult", "share"), [(1000, 4, 8, 0.6), (501, 3, 5, 0.1), (64, 8, 1, 1.0)])
def test_modality_batches_never_mix_and_lengths_are_grouped(n, batch, mult, share):
    lengths, images = records(n, seed=7, image_share=share)
    mega = batch * mult
    order = grouped_indices(lengths, images, batch, "modality_length", seed=1, megabatch_batches=mult)
    full = {True: sum(images) // mega * mega, False: (n - sum(images)) // mega * mega}
    head, tail = order[: full[True] + full[False]], order[full[True] + full[False] :]
    for start in range(0, len(head), mega):  # a megabatch: one modality, longest first (but its head)
        megabatch = head[start : start + mega]
        assert len({images[i] for i in megabatch}) == 1
        rest = [lengths[i] for i in megabatch[1:]]
        assert rest == sorted(rest, reverse=True)
    # the leftovers of each modality last: images, then text, so at most one batch mixes them
    assert [images[i] for i in tail] == sorted((images[i] for i in tail), reverse=True)
    batches = [order[s : s + batch] for s in range(0, n, batch)]
    assert sum(len({images[i] for i in b}) > 1 for b in batches) <= 1
    # the megabatches of both modalities are shuffled together, not one modality after the other
    kinds = [images[head[s]] for s in range(0, len(head), mega)]
    if 0 < sum(kinds) < len(kinds) and len(kinds) > 8:
        assert kinds != sorted(kinds, reverse=True) and kinds != sorted(kinds)


def test_length_mode_sorts_each_megabatch():
    lengths, images = records(960, seed=2)
    order = grouped_indices(lengths, images, 4, "length", seed=0, megabatch_batches=6)
    for start in range(0, 960, 24):
        rest = [lengths[i] for i in order[start + 1 : start + 24]]
        assert rest == sorted(rest, reverse=True)


def test_padding_is_counted_as_a_plain_count_does_and_grouping_saves_it():
    lengths, images = records(2000, seed=11)
    random_pad, grouped_pad = padding_saved(lengths, images, 8, "modality_length", seed=5, megabatch_batches=4)
    shuffled = grouped_indices(lengths, images, 8, "none", seed=5)
    grouped = grouped_indices(lengths, images, 8, "modality_length", seed=5, megabatch_batches=4)
    assert random_pad == reference_padding(lengths, shuffled, 8) == padded_tokens(lengths, shuffled, 8)
    assert grouped_pad == reference_padding(lengths, grouped, 8)
    assert grouped_pad < random_pad / 5  # image and text lengths apart: most padding goes
    assert padding_saved(lengths, images, 8, "none", seed=5) == (random_pad, random_pad)


def test_the_sampler_follows_the_epoch_and_the_seed():
    lengths, images = records(200, seed=1)
    sampler = GroupedSampler(lengths, images, 4, 2, "modality_length", seed=9)
    first = list(sampler)
    assert len(sampler) == 200 and first == list(sampler)
    assert first == grouped_indices(lengths, images, 4, "modality_length", seed=9, megabatch_batches=2)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(200))
    assert not hasattr(sampler, "generator")  # accelerate would replace a sampler's generator with its own


def test_lengths_and_images_read_the_arrow_columns():
    from datasets import Dataset

    rows = {
        "input_ids": [[1] * 3, [2] * 10, [], [4] * 7],
        "image": [{"bytes": b"x", "path": None}, None, None, {"bytes": None, "path": "a.png"}],
    }
    dataset = Dataset.from_dict(rows).select([3, 1, 0])  # through an indices mapping
    lengths, images = lengths_and_images(dataset)
    assert lengths.tolist() == [7, 10, 3] and images.tolist() == [True, False, True]


@pytest.mark.parametrize("mode", ["length", "modality_length"])
def test_a_training_run_with_grouped_batches_trains_and_resumes_to_the_same_adapter(train_recipe, tmp_path, mode):
    """Through the CLI: the run trains in the grouped order, and a run resumed from its step-2
    checkpoint (the Trainer skips the batches already trained) ends with the same adapter."""
    from m2pt_cli.trainer import M2PTTrainer

    seen = []
    original = M2PTTrainer.train_sampler

    def recording(self, dataset):
        sampler = original(self, dataset)
        seen.append(sampler)
        return sampler

    M2PTTrainer.train_sampler = recording
    try:
        run = tmp_path / mode
        m2pt("train", train_recipe, f"data.group_by={mode}", "train.max_steps=4", "--output-dir", run)
    finally:
        M2PTTrainer.train_sampler = original
    assert isinstance(seen[0], GroupedSampler) and seen[0].mode == mode and seen[0].megabatch_batches == 1
    assert seen[0].seed == 5  # the recipe's seed, as the Trainer's data_seed
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for stale in (resumed / "checkpoint-4", resumed / "adapter"):
        shutil.rmtree(stale)
    (resumed / "summary.json").unlink()
    m2pt("train", train_recipe, f"data.group_by={mode}", "train.max_steps=4", "--resume", resumed)
    straight, again = adapter(run), adapter(resumed)
    for key in straight:
        assert torch.allclose(again[key], straight[key], atol=1e-6, rtol=0), key


def test_an_unknown_group_by_is_refused(train_recipe):
    result = m2pt("train", train_recipe, "data.group_by=modality", check=False)
    assert result.returncode == 2
    assert "data.group_by: 'modality' is not allowed" in result.stderr and "modality_length" in result.stderr


@pytest.mark.slow  # torchrun: two processes
def test_grouped_batches_under_ddp_match_one_process(train_recipe, tmp_path):
    """Two processes of 4 see the grouped order one process of 8 sees (one megabatch per optimizer
    step, dealt out by accelerate): the same adapter, within the DDP tolerance of
    test_trainer.py::test_two_process_ddp_matches_one_process (1e-5)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    single = tmp_path / "single"
    m2pt("train", train_recipe, "data.group_by=modality_length", "train.max_steps=4", "--output-dir", single)
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "m2pt_cli", "train", str(train_recipe), "data.group_by=modality_length", "train.max_steps=4"]
    cmd += ["train.per_device_batch_size=4", "--output-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = adapter(single), adapter(run)
    for key in one:
        assert torch.allclose(two[key], one[key], atol=1e-5, rtol=0), (key, (two[key] - one[key]).abs().max())
