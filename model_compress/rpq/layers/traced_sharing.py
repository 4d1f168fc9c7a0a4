"""What sibling layers share while ``torch.compile`` traces them (one x R, one launch for q/k/v), kept on the traced
tensor they all read.

Eagerly the fusions keep such results in objects every sibling reaches (``fusions/once.py``). Traced, that costs on
every call of the compiled model, on the host: it writes back each attribute its trace changed on objects from outside
the graph, and checks in Python that each object reached by two paths (a sibling through the layer tree and through the
object they share) is still the same (dozens of checks per decoder block; a compiled decode step waited on the host).
Here a layer reaches only its own state and a constant key; the first sibling computes the shared result, carried by
the tensor (a traced value, nothing to write back), and the others read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

TRACED_MEMO = "_model_compress_traced"
Shared = TypeVar("Shared")


def traced_memo(x: Tensor) -> dict:
    """A dict carried by ``x`` while ``torch.compile`` traces. A tensor the graph makes carries it as a traced value; a
    graph input would carry it back to the caller, so only what layers inside a model share goes here."""
    memo = getattr(x, TRACED_MEMO, None)
    if memo is None:
        memo = {}
        setattr(x, TRACED_MEMO, memo)
    return memo


def traced_once(x: Tensor, key: str | None, compute: Callable[[], Shared]) -> Shared:
    """``compute()`` once per traced ``x`` and ``key`` (its first caller computes, later ones read); without a key,
    every call computes."""
    if key is None:
        return compute()
    memo = traced_memo(x)
    if key not in memo:
        memo[key] = compute()
    return memo[key]
