"""The passes over a model that data-aware fitting makes, one block of the stack at a time.

A pass shows every converted layer its calibration inputs exactly once and hands their statistics
to a callback, in model order:
  1. layers before the stack (embeddings, a projection into the stack), from the run up to the
     first block;
  2. each block's layers, from that block run on the hidden states of the blocks before it;
  3. layers after the stack (the head), from the tail replayed on the last block's outputs.
In a ``sequential`` pass the callback replaces layers (fits them) and the next block sees what
the replaced ones produce (GPTQ's sequential scheme); otherwise every block runs on the original
model's states (the measurement pass, where the callback only measures). Held-out windows go
through every stage without being recorded, so their teacher outputs exist without the fit ever
seeing them. Without a stack (no repeated blocks), one full forward records every layer at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...core.block_weights import BlockWeights, device_of
from .stack import BlockRun, BlockStack, call_model, capture_inputs, replay_tail, run_block
from .state_placement import StatePlacement, StatePlacer
from .statistics import InputStatistics, recording_inputs

BEFORE, BLOCK, AFTER = "before the stack", "block", "after the stack"


@dataclass
class Statistics:
    """What the calibration inputs of some Linear / Conv1D layers were: H per shared input."""

    inputs: InputStatistics = field(default_factory=InputStatistics)

    def names(self) -> list[str]:
        return list(self.inputs.moments)

    def groups(self) -> list[list[str]]:
        return self.inputs.groups()

    def hessian(self, name: str) -> Tensor | None:
        moment = self.inputs.moments.get(name)
        return None if moment is None else moment.mean()


# callback(stage, block index or None, statistics) -> True when it replaced modules (so their outputs change)
OnStatistics = Callable[[str, int | None, Statistics], bool]
# on_output(held_out, batch index, model output) during the tail replay
OnOutput = Callable[[bool, int, Any], None]


@dataclass
class Batches:
    """Calibration windows in batches: ``fit`` ones are recorded, ``held_out`` ones only pass through."""

    fit: list[Tensor]
    held_out: list[Tensor]


def run_pass(
    model: nn.Module,
    stack: BlockStack | None,
    layers: dict[str, nn.Module],
    batches: Batches,
    device: torch.device,
    on_statistics: OnStatistics,
    *,
    sequential: bool,
    on_output: OnOutput | None = None,
    on_block: Callable[[int, int], None] | None = None,
    weights: BlockWeights | None = None,
    on_placement: Callable[[StatePlacement], None] | None = None,
) -> None:
    """One pass over the model; ``layers`` are the converted Linear / Conv1D layers (name -> module) to record.

    ``on_block(done, total)`` is called after each block has run, while its weights are still at hand. ``weights``: where each block's weights come from
    (None: memory); a ``sequential`` pass keeps each block after it ran, another lets it go. The blocks' inputs and
    outputs are kept on ``device`` where they fit, else in host memory (``state_placement``; ``on_placement`` hears
    the decision).
    """
    weights = weights or BlockWeights()
    if stack is None:
        _whole_model_pass(model, layers, batches, device, on_statistics, on_output)
        return
    inside = {name for name in layers if stack.index_of(name) is not None}
    outside = {name: module for name, module in layers.items() if name not in inside}

    placer = StatePlacer(device, len(batches.fit) + len(batches.held_out))
    before = Statistics()
    with _recording(outside, before, device):
        calls = capture_inputs(model, stack, batches.fit, device, home_for=placer.home)
    if before.names() and on_statistics(BEFORE, None, before) and sequential:
        calls = capture_inputs(model, stack, batches.fit, device, home_for=placer.home)
    held = capture_inputs(model, stack, batches.held_out, device, home_for=placer.home) if batches.held_out else []
    if on_placement is not None and placer.decision is not None:
        on_placement(placer.decision)
    seen_before = set(before.names())

    run = BlockRun([c.hidden for c in calls], False)
    held_run = BlockRun([c.hidden for c in held], False)
    for index, block in enumerate(stack.blocks):
        weights.enter(block, stack.block_name(index), device)
        prefix = stack.block_name(index) + "."
        own = {name[len(prefix) :]: model.get_submodule(name) for name in inside if name.startswith(prefix)}
        statistics = Statistics()
        with _recording(own, statistics, device):
            run = run_block(block, calls, statistics.inputs.end_call, run_on=device)
        statistics = _prefixed(statistics, prefix)
        replaced = bool(statistics.names()) and on_statistics(BLOCK, index, statistics)
        if replaced and sequential:
            run = run_block(block, calls, run_on=device)
        if held:
            held_run = run_block(block, held, run_on=device)
            held = [c.with_hidden(o) for c, o in zip(held, held_run.outputs)]
        calls = [c.with_hidden(o) for c, o in zip(calls, run.outputs)]
        if on_block is not None:  # before the block is let go: a step may still read its weights
            on_block(index + 1, len(stack.blocks))
        weights.leave(block, stack.block_name(index), keep=sequential)

    after_layers = {name: module for name, module in outside.items() if name not in seen_before}
    after = Statistics()
    with _recording(after_layers, after, device):
        replay_tail(model, stack, batches.fit, run, device, _tagged(on_output, False))
    if batches.held_out:
        replay_tail(model, stack, batches.held_out, held_run, device, _tagged(on_output, True))
    del calls, held, run, held_run  # the calibration states: released before the head's fitting needs the room
    if after.names():
        on_statistics(AFTER, None, after)


def _whole_model_pass(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Batches,
    device: torch.device,
    on_statistics: OnStatistics,
    on_output: OnOutput | None,
) -> None:
    """No stack: the whole model on ``device``, every layer recorded in one forward per batch."""
    home = device_of(model)
    model.to(device)
    statistics = Statistics()
    try:
        with _recording(layers, statistics, device), torch.no_grad():
            for i, batch in enumerate(batches.fit):
                output = call_model(model, batch.to(device))
                statistics.inputs.end_call()
                if on_output is not None:
                    on_output(False, i, output)
        with torch.no_grad():
            for i, batch in enumerate(batches.held_out):
                output = call_model(model, batch.to(device))
                if on_output is not None:
                    on_output(True, i, output)
        on_statistics(BLOCK, None, statistics)
    finally:
        model.to(home)


@contextlib.contextmanager
def _recording(layers: dict[str, nn.Module], statistics: Statistics, device: torch.device) -> Iterator[None]:
    with recording_inputs(layers, statistics.inputs, device):
        yield


def _prefixed(statistics: Statistics, prefix: str) -> Statistics:
    """The same statistics under the layers' full names."""
    renamed = Statistics()
    renamed.inputs.moments = {prefix + name: moment for name, moment in statistics.inputs.moments.items()}
    return renamed


def _tagged(on_output: OnOutput | None, held_out: bool) -> Callable[[int, Any], None] | None:
    if on_output is None:
        return None
    return lambda index, output: on_output(held_out, index, output)

