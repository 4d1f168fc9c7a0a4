"""Launch plans kept by a layer: what its packed forward does for one input signature, decided once.

A packed layer's call picks a route (kernel, tile, split, grid) from the token count, checks formats and alignment
and builds its constants: tens of microseconds of host time, on every call, for a decision that is the same at every
decoding step. The ``*_plan`` functions of ``packed_forward`` make that decision once for inputs shaped, strided,
typed and aligned like the one given and return a call that only allocates the output and launches (past Triton's JIT,
``launch/direct_launch.py``). Layers keep those calls here, one per signature.

A plan holds the layer's tensors as they were: anything that replaces them (``.to()``, ``.half()``, a state-dict load,
new rotation signs) calls ``invalidate_all``, and every kept plan is rebuilt on its next call. Plans are used only where
no autograd records and nothing traces (``usable``): training and ``torch.compile`` take the per-call paths.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from .config import options

_GENERATION = [0]  # bumped by invalidate_all: every LaunchPlans built before is stale
_MISSING = object()
MOST_PLANS = 16  # per layer: a decoding step and a few prompt lengths; more distinct shapes start over


def invalidate_all() -> None:
    """Forget every kept plan (a layer's tensors were replaced, moved or cast)."""
    _GENERATION[0] += 1


def usable() -> bool:
    """Whether plans may serve this call: no autograd recording, no tracing, and the ``launch_plans`` option on."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and options.current().launch_plans


def input_signature(x: Tensor) -> tuple:
    """What a plan depends on in its input: shape, strides, dtype, device, pointer alignment (Triton specialises on
    16-byte alignment), and the options that change a route (Triton on, prompts fused, programmatic launch, rotation in load)."""
    current = options.current()
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16, current.triton, current.fused_prompts,
            current.programmatic_launch, current.rotate_in_load)


class LaunchPlans:
    """One layer's (or sibling group's) plans by key."""

    __slots__ = ("_plans", "_generation")

    def __init__(self) -> None:
        self._plans: dict[Hashable, Any] = {}
        self._generation = _GENERATION[0]

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The plan kept for ``key``, else ``build()``'s (kept, None included)."""
        if self._generation != _GENERATION[0]:
            self._plans.clear()
            self._generation = _GENERATION[0]
        plans = self._plans
        plan = plans.get(key, _MISSING)
        if plan is not _MISSING:
            return plan
        if len(plans) >= MOST_PLANS:
            plans.clear()
        plan = plans[key] = build()
        return plan

    def __len__(self) -> int:
        return len(self._plans) if self._generation == _GENERATION[0] else 0


def plans_of(owner: Any) -> LaunchPlans:
    """The plans kept on ``owner`` (a module or a fusion object), made on first use; never saved with a model."""
    plans = owner.__dict__.get("_launch_plans")
    if plans is None:
        plans = owner.__dict__["_launch_plans"] = LaunchPlans()
    return plans
