"""Prefill's device time: one forward over the prompt (no cache) captured in a CUDA graph, then replayed.

An eager prefill of a small model is host time (Python and launches) more than kernels: on SmolLM2's size, 3-5 ms
of kernels in 19-26 ms (benchmarks/RESULTS.md). The replayed graph is what the GPU spends, whatever the host's
speed, so both figures side by side tell which one a model's prefill waits on.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

CAPTURE_WARMUP = 2


def graphed_forward_ms(call: Callable[[], object], device: torch.device, repeats: int) -> tuple[float | None, str | None]:
    """Median ms of ``call`` replayed from a CUDA graph (captured after warm-up runs on a side stream), or None and why
    it could not be captured (a forward that syncs with the host)."""
    try:
        with torch.inference_mode():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARMUP):
                    call()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            graph.replay()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        del graph
        return statistics.median(times), None
    except RuntimeError as error:
        return None, str(error).splitlines()[0][:200]
