"""What a kernel needs to apply a LayerNorm or RMSNorm to its input itself (plain data, imports without Triton)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

LAYER_NORM = 1  # (x - mean) / sqrt(var + eps) * weight (+ bias, folded into the consumer's bias)
RMS_NORM = 2  # x / sqrt(mean(x^2) + eps) * weight


@dataclass(frozen=True)
class NormSpec:
    weight: Tensor
    eps: float
    kind: int


class DeferredNormLike(Protocol):
    """A norm whose work the consumer's kernel takes over (``fusions.norm.DeferredNorm``)."""

    spec: NormSpec

    def normalized(self, x: Tensor) -> Tensor: ...


class NormedInputLike(Protocol):
    """What an RPQ Linear behind a deferred norm hands its forward (``fusions.norm.NormedInput``)."""

    norm: DeferredNormLike

    @property
    def fused_bias(self) -> Tensor | None: ...
