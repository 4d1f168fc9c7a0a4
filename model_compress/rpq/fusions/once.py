"""A function of a tensor that several consumers need, computed by the first and handed to the others.

Attention calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` in turn on the very same tensor; whatever all three
do to ``x`` first (a deferred norm, an input rotation) needs computing once. The result is kept only until every
consumer has taken it: an activation kept past its layers would add to the memory peak.

Under ``torch.compile`` the result is kept on the traced tensor itself (``layers/traced_sharing.py``), not in this
object: a compiled model writes every attribute its trace changed on objects from outside the graph back after each
call, on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..layers.traced_sharing import traced_once


def write_version(x: Tensor) -> int | None:
    """x's in-place write counter; None for inference tensors (they keep none) and while ``torch.compile`` traces (a
    traced graph is functional): identity alone must do."""
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class OncePerInput:
    """``compute(x)`` for ``consumers`` calls with the same ``x`` (same tensor, not written in between), computed once."""

    def __init__(self, compute: Callable[[Tensor], Tensor], consumers: int) -> None:
        self.compute = compute
        self.consumers = consumers
        self._input: Tensor | None = None
        self._version: int | None = None
        self._output: Tensor | None = None
        self._left = 0

    @property
    def holding(self) -> bool:
        """Whether a result is kept for consumers still to come."""
        return self._output is not None

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return traced_once(x, f"once {id(self)}", lambda: self.compute(x))
        version = write_version(x)
        if x is self._input and version == self._version and self._left > 0:
            self._left -= 1
            out = self._output
        else:
            out = self.compute(x)
            self._left, self._input, self._version, self._output = self.consumers - 1, x, version, out
        if self._left == 0:
            self._input = self._output = None
        return out
