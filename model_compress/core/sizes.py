"""How big a model is: parameters and the bytes a checkpoint of it holds."""

from __future__ import annotations

from torch import nn

MB = 1e6


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and persistent buffer (what a checkpoint holds)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
