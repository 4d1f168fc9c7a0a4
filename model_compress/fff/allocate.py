"""Neurons per token block by block: the blocks whose trees hurt the model more keep more, at the mean share asked.

Each block is built (not trained) at a few shares around the asked one and put alone in the model's place of
that block; the model's output on held-out calibration windows is compared with the original's (KL of the
next-token distributions for LMs, the final hidden states' error for encoders). A block's own output error is
not the measure: measured on all-MiniLM-L6-v2 (CPU, 2026-12-02), giving more neurons to the blocks with the
largest block error lowered the mean block error (0.363 -> 0.341) and still lowered the embedding cosine
(0.749 -> 0.719). Then one share per block is chosen to minimise the summed model-level loss with the mean
share at most the asked one: each block takes the share minimising loss + lambda * share, lambda bisected
until the mean fits, then what the discrete steps leave of the budget is spent where a step saves the most loss
per share (the losses of single-block swaps are taken as adding up, as in mixed-precision sensitivity
measurement). Measured on all-MiniLM-L6-v2 this choice was not better than one share for all, so it is opt-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .blocks import Block, DenseWeights, swapped
from .capture import BlockRecord, Calibration
from .distill import FFFSettings, initialised_tree, model_outputs, on_device, output_distance

# Shares tried per block, as multiples of the asked mean (clipped to what the depth allows and to 1).
CANDIDATE_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
PROBE_WINDOWS = 4  # held-out calibration windows the model-level loss is measured on
BISECTIONS = 60


@dataclass
class Candidates:
    """The shares a block was built at and the model's loss with that block alone replaced, at each."""

    shares: list[float]
    losses: list[float]


def candidate_shares(settings: FFFSettings) -> list[float]:
    """Shares around the asked mean: never under the leaves alone (k / 2**depth), never over the whole block."""
    floor = settings.leaves_per_token / 2**settings.depth
    return sorted({min(1.0, max(floor, settings.neurons_per_token * factor)) for factor in CANDIDATE_FACTORS})


class ModelProbe:
    """The original model's outputs on a few held-out windows, and the loss of a changed model against them."""

    def __init__(self, model: nn.Module, calibration: Calibration, device: torch.device) -> None:
        windows = calibration.input_ids.shape[0]
        rows = torch.arange(max(0, windows - PROBE_WINDOWS), windows)
        self.ids = calibration.input_ids[rows].to(device)
        self.mask = calibration.attention_mask[rows].to(device)
        with torch.no_grad():
            self.target = model_outputs(model, self.ids, self.mask)

    def loss(self, model: nn.Module) -> float:
        with torch.no_grad():
            return output_distance(model_outputs(model, self.ids, self.mask), self.target, self.mask).item()


def measure(
    model: nn.Module, block: Block, dense: DenseWeights, record: BlockRecord, settings: FFFSettings, probe: ModelProbe,
    advance: Callable[[int], None] | None = None,
) -> Candidates:
    """The model's loss with this block alone replaced by its tree, at every candidate share."""
    dense = on_device(dense, settings.device)
    shares, losses = candidate_shares(settings), []
    for share in shares:
        tree, *_ = initialised_tree(dense, record, replace(settings, neurons_per_token=share))
        with swapped(model, block, tree):
            losses.append(probe.loss(model))
        if advance is not None:
            advance(1)
    return Candidates(shares, losses)


def choose_shares(candidates: list[Candidates], mean_share: float) -> list[float]:
    """One share per block minimising the summed loss, with the mean share at most ``mean_share``."""

    def pick(weight: float) -> list[float]:
        return [min(zip(c.shares, c.losses), key=lambda option: option[1] + weight * option[0])[0] for c in candidates]

    def fits(shares: list[float]) -> bool:
        return sum(shares) / len(shares) <= mean_share + 1e-9

    if fits(pick(0.0)):
        return pick(0.0)
    low, high = 0.0, 1.0
    while not fits(pick(high)) and high < 1e12:
        high *= 4
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if not fits(pick(middle)) else (low, middle)
    return _spend_the_rest(candidates, pick(high), mean_share)


def _spend_the_rest(candidates: list[Candidates], chosen: list[float], mean_share: float) -> list[float]:
    """Raise blocks one step at a time, best loss saved per share first, while the mean stays within budget."""
    chosen = list(chosen)
    budget = mean_share * len(chosen) + 1e-9
    while True:
        best, best_gain = None, 0.0
        for block, c in enumerate(candidates):
            step = c.shares.index(chosen[block]) + 1
            if step == len(c.shares) or sum(chosen) - chosen[block] + c.shares[step] > budget:
                continue
            gain = (c.losses[step - 1] - c.losses[step]) / (c.shares[step] - c.shares[step - 1])
            if gain > best_gain:
                best, best_gain = block, gain
        if best is None:
            return chosen
        chosen[best] = candidates[best].shares[candidates[best].shares.index(chosen[best]) + 1]
