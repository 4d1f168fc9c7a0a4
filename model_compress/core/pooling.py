"""Mean pooling of a sentence-embedding model's states: what `compress eval` compares and fff-distill trains on."""

from __future__ import annotations

import torch


def mean_pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden): the mean of each sequence's real tokens' states (sentence-transformers' pooling)."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1)
