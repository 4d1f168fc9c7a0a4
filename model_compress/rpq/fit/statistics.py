"""Input statistics of layers while a model (or one block of it) runs: H = sum x x^T per distinct input.

Layers that read the very same tensor (q/k/v after one norm, gate/up) share one accumulator: H is
computed once for them, and the fit may stack them. Sharing is found by identity of the input
tensor within a forward call, the only test that holds for every architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .hessian import SecondMoment


class InputStatistics:
    """One SecondMoment per group of layers that share their input; ``groups`` lists the names in each."""

    def __init__(self) -> None:
        self.moments: dict[str, SecondMoment] = {}
        self._by_input: dict[int, tuple[Tensor, SecondMoment]] = {}

    def observe(self, name: str, x: Tensor, device: torch.device) -> None:
        """Add ``x`` for layer ``name``, once per tensor however many layers read it."""
        held = self._by_input.get(id(x))
        if held is not None and held[0] is x:
            self.moments.setdefault(name, held[1])
            if self.moments[name] is held[1]:
                return
        moment = self.moments.get(name)
        if moment is None:
            moment = SecondMoment(x.shape[-1], device)
            self.moments[name] = moment
        moment.add(x.detach())
        self._by_input[id(x)] = (x, moment)  # the reference keeps the id unique while the tensor is held

    def end_call(self) -> None:
        """Forget the tensors of the last forward call (their ids may be reused after it)."""
        self._by_input.clear()

    def groups(self) -> list[list[str]]:
        """Names grouped by shared accumulator, in first-seen order."""
        seen: dict[int, list[str]] = {}
        for name, moment in self.moments.items():
            seen.setdefault(id(moment), []).append(name)
        return list(seen.values())


@contextlib.contextmanager
def recording_inputs(modules: dict[str, nn.Module], statistics: InputStatistics, device: torch.device) -> Iterator[None]:
    """Accumulate every call's first input of each named module into ``statistics`` while the block runs."""
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: statistics.observe(name, args[0], device))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_tokens(windows: Tensor, vocab: int) -> Tensor:
    """How often each token id occurs in ``windows``: the row weights of an embedding's fit."""
    ids = windows.reshape(-1)
    ids = ids[(ids >= 0) & (ids < vocab)]
    return torch.bincount(ids, minlength=vocab).float()
