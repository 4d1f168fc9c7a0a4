"""Which activation a tree's module computes, told by its values (not its class): what the kernels can fuse.

Models spell the same function many ways (``nn.GELU``, transformers' ``GELUActivation``, ``NewGELUActivation``,
``PytorchGELUTanh``, ``nn.SiLU``, ``SiLUActivation``...). Probing the module on a grid of values and comparing
with the formulas the kernels know covers them all, and refuses anything else (the eager path then runs).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")  # the order of the kernels' ACT constexpr
PROBE = torch.linspace(-8.0, 8.0, 401, dtype=torch.float64)


def _formula(name: str, v: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return v * torch.sigmoid(v)
    if name == "gelu":
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    return v.clamp_min(0)


def kernel_activation(module: nn.Module) -> int | None:
    """The kernels' code for ``module``'s function (an index into ACTIVATIONS), or None if it is none of them."""
    return _probed(module)


@functools.lru_cache(maxsize=64)
def _probed(module: nn.Module) -> int | None:
    with torch.no_grad():
        try:
            values = module(PROBE.float()).double()
        except Exception:  # a module that needs other inputs: not one the kernels know
            return None
    for code, name in enumerate(ACTIVATIONS):
        if torch.allclose(values, _formula(name, PROBE), rtol=1e-5, atol=1e-5):
            return code
    return None
