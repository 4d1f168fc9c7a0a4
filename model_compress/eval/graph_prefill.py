"""Prefill's device time: one forward over the prompt (no cache) captured in a CUDA graph, then replayed.

An eager prefill of a small model is host time (Python and launches) more than kernels: on SmolLM2's size, 3-5 ms
of kernels in 19-26 ms (benchmarks/RESULTS.md). The replayed graph is what the GPU spends, whatever the host's
speed, so both figures side by side tell which one a model's prefill waits on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .graph_decode import captured_graph, median_ms_per_step

CAPTURE_WARMUP = 2


def graphed_forward_ms(call: Callable[[], object], device: torch.device, repeats: int) -> tuple[float | None, str | None]:
    """Median ms of ``call`` replayed from a CUDA graph (after one untimed replay), or None and why it could not be
    captured (a forward that syncs with the host)."""
    try:
        with torch.inference_mode():
            graph = captured_graph(call, device, CAPTURE_WARMUP)
            milliseconds = median_ms_per_step(graph.replay, lambda: None, 1, repeats, device)
        del graph
        return milliseconds, None
    except RuntimeError as error:
        return None, str(error).splitlines()[0][:200]
