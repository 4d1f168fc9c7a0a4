"""What a kernel needs to apply a LayerNorm or RMSNorm to its input itself (plain data, imports without Triton)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

LAYER_NORM = 1  # (x - mean) / sqrt(var + eps) * weight (+ bias, folded into the consumer's bias)
RMS_NORM = 2  # x / sqrt(mean(x^2) + eps) * weight


@dataclass(frozen=True)
class NormSpec:
    weight: Tensor
    eps: float
    kind: int
