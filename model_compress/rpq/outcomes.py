"""What a conversion produced, layer by layer, and what it reports while it works: each layer's result, the budget's
allocation, the conversion as a whole, and the callbacks a progress display implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .fit.allocate import BudgetError, Option, allocate
from .fit.state_placement import StatePlacement
from .plan import CANDIDATES_ABOVE, LayerPlan


@dataclass
class LayerResult:
    """A converted layer: its plan, ||W - W_hat|| / ||W||, the relative output error on calibration data, rounds, seconds.

    ``output_error`` is tr(dW H dW^T) / tr(W H W^T) (an embedding: the token-weighted error), None
    where the layer saw no calibration inputs.
    """

    plan: LayerPlan
    weight_error: float
    output_error: float | None
    rounds: int
    seconds: float
    loss_weight: float | None = None  # predicted KL (nats per token) of a relative output error of 1 (fit.sensitivity)
    weighted_error: float | None = None  # the output error with its channels weighed by the Fisher diagonal (Linears)

    @property
    def estimated_kl(self) -> float | None:
        """The KL to the original this layer's output error alone predicts (second order, nats per token)."""
        error = self.weighted_error if self.weighted_error is not None else self.output_error
        if self.loss_weight is None or error is None:
            return None
        return self.loss_weight * error


@dataclass
class Allocation:
    """What a budget chose from: every layer's measured candidates (format, bits, error) and the pick."""

    budget: float
    options: dict[str, list[Option]]  # errors already multiplied by the layer's loss weight
    chosen: dict[str, Option]
    weights: int  # how many weights the budget is spread over
    loss_weights: dict[str, float]
    sensitivity: dict[str, dict] = field(default_factory=dict)  # per weighed module: Sensitivity.to_json()

    def usable_bits(self, threshold: float, step: float = 0.25) -> float | None:
        """The smallest budget (in ``step`` increments above this one) whose allocation keeps the mean
        relative output error per layer at or under ``threshold``; None if no measured candidate does."""
        total = self.weights
        lists = list(self.options.values())
        budget = self.budget
        while budget <= self.budget + CANDIDATES_ABOVE:
            budget += step
            try:
                chosen = allocate(lists, budget * total)
            except BudgetError:
                continue
            errors = [o.error / self.loss_weights[name] for name, o in zip(self.options, chosen)]
            if sum(errors) / len(errors) <= threshold:
                return budget
        return None

    def to_json(self) -> dict:
        return {
            "budget_bits": self.budget,
            "objective": "sum over layers of loss weight x relative output error, subject to the stored bits; a loss "
            "weight is the KL to the original (nats per token) that a relative output error of 1 predicts, from the "
            "Fisher information of the model's output in the layer's output (1 where nothing was weighed); a Linear's "
            "errors (candidates' output_error) weigh each output channel by its Fisher diagonal",
            "sensitivity": self.sensitivity,
            "layers": {
                name: {
                    "chosen": self.chosen[name].choice.to_json(),
                    "loss_weight": self.loss_weights[name],
                    "candidates": [
                        {**o.choice.to_json(), "bits": o.bits, "output_error": o.error / self.loss_weights[name]}
                        for o in options
                    ],
                }
                for name, options in self.options.items()
            },
        }


@dataclass
class Conversion:
    """Per layer in model order: a LayerResult (converted) or its LayerPlan (dense); the allocation if any."""

    outcomes: list[LayerPlan | LayerResult]
    allocation: Allocation | None
    calibration: dict | None


class ConversionObserver:
    """Progress callbacks; the CLI draws them with Rich, a library user may ignore them."""

    def started(self, plans: list[LayerPlan]) -> None:
        """Called once, before any work, with every plan (converted and dense)."""

    def measuring(self, done: int, total: int) -> None:
        """Candidate formats measured for ``done`` of ``total`` blocks (budget mode only)."""

    def calibration_states(self, placement: StatePlacement) -> None:
        """Where a pass keeps the blocks' inputs and outputs (GPU or host memory), decided at its start."""

    def layer_started(self, plan: LayerPlan) -> None:
        """Called before a layer is fitted."""

    def layer_finished(self, result: LayerResult) -> None:
        """Called after a layer has been fitted and swapped."""

