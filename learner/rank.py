"""Who a learner rank is among the others: its place in the group, its device and its one collective for scalars.

Every part of the learner that needs the group (the steps, the trained models, the checkpointer) holds this small
record instead of the worker, so none of them reaches into another's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from learner import engine as eng


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    device: torch.device
    backend: str  # the learner's process-group backend: "gloo" reduces on the CPU, "nccl" on the device

    @classmethod
    def current(cls, device: torch.device, backend: str) -> "RankContext":
        """This process's place in the (already initialised) learner group."""
        return cls(eng.rank(), eng.world_size(), device, backend)

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Over the learner's ranks (a collective: every rank calls it, in the same order)."""
        return eng.all_reduce(values, op, self.device if self.backend == "nccl" else "cpu")

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a group of one)."""
        if self.world_size > 1:
            torch.distributed.barrier()
