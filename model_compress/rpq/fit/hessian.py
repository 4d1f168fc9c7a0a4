"""The input second moment H = sum x x^T of a layer on calibration data, and what the sweep needs from it.

H is accumulated in float64 (each batch's x^T x in float32, summed in float64), so millions of
calibration tokens add up without losing the small directions. Before the sweep it is dampened
(GPTQ's 1% of the mean diagonal), columns that never saw a non-zero input get a unit diagonal,
and the upper Cholesky factor of H^-1 gives the error feedback of every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DAMPING = 0.01  # fraction of the mean diagonal added to H (GPTQ's default "percdamp")
MAX_DAMPING_TRIES = 6  # each try multiplies the damping by 10 when H is numerically singular


class SecondMoment:
    """Running sum of x x^T over the rows of the inputs it is shown, and their count."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        """Add every row of ``x`` (..., features)."""
        rows = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += (rows.T @ rows).double()
        self.rows += rows.shape[0]

    def mean(self) -> Tensor:
        """H / rows in float32: the per-token second moment (the scale does not change any fit)."""
        return (self.sum / max(1, self.rows)).float()


@dataclass
class SweepFactor:
    """H prepared for the sweep: the dampened H and the upper Cholesky factor U of its inverse (H^-1 = U^T U)."""

    hessian: Tensor
    inverse_factor: Tensor
    damping: float


def prepare(hessian: Tensor, damping: float = DAMPING) -> SweepFactor:
    """Dampen ``hessian`` (n, n) and factor its inverse; dead columns (zero diagonal) get a unit diagonal.

    Raises ValueError when no damping up to 10^MAX_DAMPING_TRIES times ``damping`` makes it positive definite.
    """
    h = hessian.float().clone()
    diagonal = h.diagonal()
    dead = diagonal <= 0
    mean = diagonal[~dead].mean() if bool((~dead).any()) else h.new_tensor(1.0)
    diagonal[dead] = mean
    for attempt in range(MAX_DAMPING_TRIES):
        damp = damping * 10**attempt
        dampened = h + damp * mean * torch.eye(h.shape[0], device=h.device)
        lower, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return SweepFactor(dampened, upper, damp)
    raise ValueError("the input second moment is not positive definite even after strong damping")
