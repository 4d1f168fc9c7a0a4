"""The RPQ runtime switches: Triton on or off, code bins, a routes file, the fusions.

One frozen object, read from the environment once (the edge: ``MODEL_COMPRESS_TRITON``,
``MODEL_COMPRESS_RPQ_BINS``, ``MODEL_COMPRESS_RPQ_ROUTES``, ``MODEL_COMPRESS_FUSED_NORM``,
``MODEL_COMPRESS_FUSED_ACT``, ``MODEL_COMPRESS_LAUNCH_PLANS``, ``MODEL_COMPRESS_FUSED_PROMPTS``,
``MODEL_COMPRESS_PROGRAMMATIC_LAUNCH``, ``MODEL_COMPRESS_ROTATE_IN_LOAD``; ``0`` switches one off, ``1`` one on), and overridable in code for a block with
``using(...)``. Nothing deeper reads the environment, and nothing needs a cache cleared to see a change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

import torch

TRITON_ENV = "MODEL_COMPRESS_TRITON"
BINS_ENV = "MODEL_COMPRESS_RPQ_BINS"
ROUTES_ENV = "MODEL_COMPRESS_RPQ_ROUTES"
FUSED_NORM_ENV = "MODEL_COMPRESS_FUSED_NORM"
FUSED_GLU_ENV = "MODEL_COMPRESS_FUSED_ACT"
LAUNCH_PLANS_ENV = "MODEL_COMPRESS_LAUNCH_PLANS"
FUSED_PROMPTS_ENV = "MODEL_COMPRESS_FUSED_PROMPTS"
PROGRAMMATIC_LAUNCH_ENV = "MODEL_COMPRESS_PROGRAMMATIC_LAUNCH"
ROTATE_IN_LOAD_ENV = "MODEL_COMPRESS_ROTATE_IN_LOAD"


@dataclass(frozen=True)
class RPQOptions:
    triton: bool = True  # the Triton kernels where a GPU and Triton are there (else the torch forms)
    bins: bool = True  # one-token calls may use the binned kernel (its code bins cost 2-4 bytes per code)
    routes_file: Path | None = None  # a routes table saved by benchmarks/rpq/rpq_kernels.py --save-routes
    fused_norm: bool = True  # pre-norms deferred into the one-token kernel, at load
    fused_glu: bool = True  # SiLU(gate) * up formed inside down_proj's one-token kernel, at load
    launch_plans: bool = True  # eager inference keeps each layer's route and launches past Triton's JIT (kernels/plans.py)
    fused_prompts: bool = True  # prompts on 4/5-bit row tables multiply on tensor cores without writing W' (packed/nibble_prompts.py)
    # On Hopper on, decode kernels start while the kernel before ends (triton/common.py). Off until a GPU run has
    # measured it and checked it under CUDA graph capture (tests/rpq/test_packed_kernels.py, benchmarks/device/plans_check.sh).
    programmatic_launch: bool = False
    # Byte-permute launches rotate their input (and form down_proj's SiLU gate) as they load it, where no kernel before
    # them wrote x R (packed/nibble_products.py); off: a rotation launch first, as before.
    rotate_in_load: bool = True

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> RPQOptions:
        def on(name: str, default: str = "1") -> bool:
            return environ.get(name, default) != "0"

        routes = environ.get(ROUTES_ENV)
        return cls(on(TRITON_ENV), on(BINS_ENV), Path(routes) if routes else None, on(FUSED_NORM_ENV), on(FUSED_GLU_ENV),
                   on(LAUNCH_PLANS_ENV), on(FUSED_PROMPTS_ENV), on(PROGRAMMATIC_LAUNCH_ENV, "0"),
                   on(ROTATE_IN_LOAD_ENV))


_ENVIRONMENT: list[RPQOptions] = []  # the environment's options, read on first use
_OVERRIDE: ContextVar[RPQOptions | None] = ContextVar("rpq_options", default=None)


def current() -> RPQOptions:
    """The options in force: the innermost ``using`` block's, else the environment's (read once). While
    ``torch.compile`` traces, the environment's: the compiler cannot trace the context variable a block sets."""
    override = None if torch.compiler.is_compiling() else _OVERRIDE.get()
    if override is not None:
        return override
    if not _ENVIRONMENT:
        _ENVIRONMENT.append(RPQOptions.from_environment())
    return _ENVIRONMENT[0]


@contextlib.contextmanager
def using(**changes) -> Iterator[RPQOptions]:
    """``with using(triton=False): ...``: the current options with ``changes``, inside the block only."""
    options = replace(current(), **changes)
    token = _OVERRIDE.set(options)
    try:
        yield options
    finally:
        _OVERRIDE.reset(token)
