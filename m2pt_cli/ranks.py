"""The processes of a data-parallel launch (torchrun, accelerate launch): which one this is, how the
work is shared, and waiting for the others. A plain ``m2pt`` run is rank 0 of 1."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    started_group: bool = False  # this m2pt call made the process group, and ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's part of ``items``: every ``world``-th item from position ``rank``."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def leave(self) -> None:
        if self.started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def launched() -> bool:
    """Whether a launcher started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> Ranks:
    """This process's place in the launch; joins the process group the launcher described
    (NCCL for CUDA devices, gloo for the CPU) unless one is already running."""
    if not launched():
        return Ranks()
    import torch
    import torch.distributed as dist

    started = False
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        started = True
    return Ranks(dist.get_rank(), dist.get_world_size(), started)
