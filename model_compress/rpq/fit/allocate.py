"""Choosing each layer's format under a bit budget from measured errors (a multiple-choice knapsack).

Each layer offers candidates (format, bits, measured relative output error). The allocation
minimises the sum of the layers' relative output errors subject to the stored bits of all
layers together staying within the budget: every layer's output error, relative to its output,
is taken to cost the model about the same (exllamav2's measure-then-optimise scheme makes the
same assumption with its per-layer accuracies). Solved by Lagrangian relaxation (each layer takes
argmin error + lambda * bits for a lambda found by bisection), then the bits left over are spent
greedily on the upgrades that buy the most error per bit.

A layer that holds a large share of the bits (a big embedding table) moves the total in coarse steps: with it
one step below the budget's share, no single upgrade of a small layer may fit the bits left, and a fifth of a
bit per weight stays unspent. So each such layer's every option is also tried fixed, the others solved again
for the bits it leaves, and the best whole allocation kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

Choice = TypeVar("Choice")


@dataclass
class Option(Generic[Choice]):
    """One candidate of one layer: what it is, what it stores (bits), what it costs in error."""

    choice: Choice
    bits: float
    error: float


class BudgetError(ValueError):
    """The budget is below what the cheapest option of every layer needs together."""

    def __init__(self, needed: float) -> None:
        super().__init__(f"the cheapest choices need {needed:.0f} bits")
        self.needed = needed


# A layer whose dearest option takes at least this share of the budget is also tried at each of its options
# with the rest solved again (see the module's docstring).
LARGE_SHARE = 0.05


def allocate(options: list[list[Option]], budget_bits: float, iterations: int = 60) -> list[Option]:
    """One option per layer, total bits <= ``budget_bits``, least total error found."""
    cheapest = [min(layer, key=lambda o: (o.bits, o.error)) for layer in options]
    if sum(o.bits for o in cheapest) > budget_bits * (1 + 1e-12):
        raise BudgetError(sum(o.bits for o in cheapest))
    best = _relaxed(options, budget_bits, iterations)
    for index, layer in enumerate(options):
        if max(o.bits for o in layer) < LARGE_SHARE * budget_bits:
            continue
        rest = options[:index] + options[index + 1 :]
        for fixed in layer:
            left = budget_bits - fixed.bits
            if not rest or sum(o.bits for o in cheapest) - cheapest[index].bits > left * (1 + 1e-12):
                continue
            others = _relaxed(rest, left, iterations)
            candidate = others[:index] + [fixed] + others[index:]
            if _total_error(candidate) < _total_error(best):
                best = candidate
    return best


def _total_error(chosen: list[Option]) -> float:
    return sum(o.error for o in chosen)


def _relaxed(options: list[list[Option]], budget_bits: float, iterations: int) -> list[Option]:
    """Lagrangian relaxation (bisection on the price of a bit), then the leftover spent greedily."""
    low, high = 0.0, 1.0
    while sum(o.bits for o in _pick(options, high)) > budget_bits and high < 1e30:
        high *= 4
    best = _pick(options, high)
    for _ in range(iterations):
        middle = (low + high) / 2
        chosen = _pick(options, middle)
        if sum(o.bits for o in chosen) <= budget_bits:
            best, high = chosen, middle
        else:
            low = middle
    return _spend_rest(options, best, budget_bits)


def _pick(options: list[list[Option]], price: float) -> list[Option]:
    return [min(layer, key=lambda o: (o.error + price * o.bits, o.bits)) for layer in options]


def _spend_rest(options: list[list[Option]], chosen: list[Option], budget_bits: float) -> list[Option]:
    """Greedy upgrades (most error saved per extra bit first) while the budget allows."""
    chosen = list(chosen)
    spent = sum(o.bits for o in chosen)
    while True:
        best, best_gain = None, 0.0
        for index, layer in enumerate(options):
            current = chosen[index]
            for option in layer:
                extra = option.bits - current.bits
                saved = current.error - option.error
                if saved <= 0 or spent + extra > budget_bits:
                    continue
                gain = saved / max(extra, 1e-9)
                if gain > best_gain:
                    best, best_gain = (index, option), gain
        if best is None:
            return chosen
        index, option = best
        spent += option.bits - chosen[index].bits
        chosen[index] = option
