"""The processes a conversion is spread over (one per GPU, started by ``torchrun``), and the few collectives it needs.

A single process is ``Workers()``: rank 0 of 1, every collective a no-op, so code written against this runs the same
alone. Several are started by ``torchrun --nproc-per-node N -m model_compress.cli ...`` (or by ``compress rpq --gpus N``); the CLI reads torchrun's
environment there, at the edge (``from_launcher``), and hands the result down as an argument. Communication is
torch.distributed's (NCCL between GPUs, gloo on CPUs): nothing is sent by hand.

What is spread: each process runs its share of the calibration batches (``share``), the second moments are summed
across processes (``sum_``) so every process fits on the same statistics, and the layers' fitting is split among
them, each result handed to all (``broadcast``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# the others wait in a collective while one process works alone (the Fisher pass, a large embedding's fit), which may
# take hours on a large model; torch.distributed's default of 10 minutes would end the run
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Workers:
    """This process's rank among ``world`` processes (one GPU each)."""

    rank: int = 0
    world: int = 1

    @property
    def spread(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """The process that writes the output and speaks to the user."""
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This process's items: every ``world``-th from its rank on (whole batches, so each is computed as alone)."""
        return items[self.rank :: self.world]

    def owner(self, position: int) -> int:
        """The process that does work item ``position`` (round robin)."""
        return position % self.world

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place (a no-op alone)."""
        if self.spread:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order."""
        if not self.spread:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any, source: int) -> Any:
        """``source``'s ``value`` (picklable, tensors included), on every process."""
        if not self.spread:
            return value
        holder = [value if self.rank == source else None]
        dist.broadcast_object_list(holder, src=source)
        return holder[0]


def from_launcher(environ: Mapping[str, str] = os.environ, device: str = "cpu") -> Workers:
    """The processes ``torchrun`` started (its ``RANK`` / ``WORLD_SIZE`` variables), the process group joined: NCCL
    for CUDA, gloo otherwise; a lone process where torchrun did not start this one."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Workers()
    rank = int(environ["RANK"])
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Workers(rank, world)
