"""A conversion's work split among processes (``core.workers``): statistics summed, layers fitted by one process each
and handed to all, so that every process holds the same model after each block, as one process alone would.

Each process runs its share of the calibration batches through a block; ``summed`` adds the second moments up
across processes, so every process sees the statistics of all the batches. ``Spread`` then gives each work item
(a group of layers sharing an input, an embedding table) to one process, which computes it; its result is sent to
all (on the host: a tensor pickled on one GPU would come back on that GPU's number elsewhere). Items that do not
depend on each other (the groups of one block) are computed first, each process its own, and handed over after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ...core.workers import Workers
from .passes import Statistics

T = TypeVar("T")


def summed(statistics: Statistics, workers: Workers) -> Statistics:
    """``statistics`` with every second moment (and its row count) summed over the processes, in place."""
    if not workers.spread:
        return statistics
    for group in statistics.groups():  # the same order in every process: the same block, the same code path
        moment = statistics.inputs.moments[group[0]]
        workers.sum_(moment.sum)
        rows = torch.tensor([float(moment.rows)], dtype=torch.float64, device=moment.sum.device)
        moment.rows = int(workers.sum_(rows).item())
    return statistics


Job = tuple[Callable[[], Any], Callable[[Any], None]]  # (compute, apply): computed by one process, applied by all


class Spread:
    """Work items handed out in turn, over every call: item n is done by process n mod world."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self._turn = 0

    def run(self, compute: Callable[[], T]) -> T:
        """``compute()`` on this item's process, its result on every process (on the same kind of device)."""
        results: list[T] = []
        self.run_all([(compute, results.append)])
        return results[0]

    def run_all(self, jobs: list[Job]) -> None:
        """Independent jobs: each process computes the ones it owns, all of them first (so the processes work at
        once), then every result is handed to all and applied in order. Alone: each computed and applied in turn."""
        if not self.workers.spread:
            for compute, apply in jobs:
                apply(compute())
            return
        owners = [self.workers.owner(self._turn + position) for position in range(len(jobs))]
        self._turn += len(jobs)
        mine = {position: compute() for position, ((compute, _), owner) in enumerate(zip(jobs, owners))
                if owner == self.workers.rank}
        for position, ((_, apply), owner) in enumerate(zip(jobs, owners)):
            apply(self._handed(mine.pop(position, None), owner))

    def _handed(self, result: Any, owner: int) -> Any:
        """``owner``'s result, sent to every process on the host and put on this process's device of its kind."""
        if self.workers.rank == owner:
            self.workers.broadcast((to_host(result), _device_type(result)), owner)
            return result
        host, kind = self.workers.broadcast(None, owner)
        return on_device(host, None if kind is None else torch.device(kind))  # "cuda": this process's own GPU


def to_host(value: Any) -> Any:
    """``value`` with every tensor in it (dataclasses, lists, tuples, dicts) moved to the CPU."""
    return _mapped(value, lambda tensor: tensor.cpu())


def on_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor moved to ``device`` (None: left where it is)."""
    return value if device is None else _mapped(value, lambda tensor: tensor.to(device))


def _device_type(value: Any) -> str | None:
    """The device type of the first tensor in ``value`` ("cuda", "cpu"; None without tensors)."""
    found: list[str] = []
    _mapped(value, lambda tensor: found.append(tensor.device.type) or tensor)
    return found[0] if found else None


def _mapped(value: Any, move: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return move(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _mapped(getattr(value, f.name), move) for f in dataclasses.fields(value)
                                             if f.init})
    if isinstance(value, (list, tuple)):
        return type(value)(_mapped(item, move) for item in value)
    if isinstance(value, dict):
        return {key: _mapped(item, move) for key, item in value.items()}
    return value
