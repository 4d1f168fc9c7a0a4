"""Decode speed of a model under ``torch.compile``: what a user who compiles the model gets.

The same fixed-shape greedy step as ``graph_decode`` (static KV cache, inputs updated in place), with the model
compiled: on CUDA in ``reduce-overhead`` mode, which replays the compiled step from CUDA graphs; elsewhere in the
default mode. The first steps compile (not timed); then ``repeats`` blocks of ``steps`` steps are timed from the
end of the prompt, and the graph breaks the compiler met are counted (0 means one graph per step).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .graph_decode import CAPTURE_WARMUP, DecodeStep


@dataclass
class CompiledDecode:
    """Median time of one compiled decode step of the whole batch, the graph breaks met, or why there is none."""

    batch: int
    ms_per_step: float | None = None
    peak_memory: int | None = None
    graph_breaks: int | None = None
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.ms_per_step is None else self.batch * 1e3 / self.ms_per_step


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def compiled_decode(model: nn.Module, prompt: torch.Tensor, steps: int, repeats: int) -> CompiledDecode:
    """Compile ``model`` and time ``repeats`` blocks of ``steps`` greedy decode steps of it."""
    device = prompt.device
    cuda = device.type == "cuda"
    result = CompiledDecode(batch=prompt.shape[0])
    torch._dynamo.reset()
    breaks_before = _graph_breaks()
    try:
        compiled = torch.compile(model, mode="reduce-overhead" if cuda else None, dynamic=False)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            step = DecodeStep(model, prompt, steps)
            step.prefill()  # eager: only the one-token step is compiled
            step.model = compiled
            for _ in range(CAPTURE_WARMUP):  # compiles, then records the CUDA graphs
                step()
            times = []
            for _ in range(repeats + 1):  # the first block is a warm-up
                step.rewind()
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(steps):
                        step()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / steps)
                else:
                    began = time.perf_counter()
                    for _ in range(steps):
                        step()
                    times.append((time.perf_counter() - began) * 1e3 / steps)
        result.ms_per_step = statistics.median(times[1:])
        result.peak_memory = torch.cuda.max_memory_allocated(device) if cuda else None
        result.graph_breaks = _graph_breaks() - breaks_before
    except Exception as error:  # noqa: BLE001 - a model the compiler cannot take: reported, the rest still measured
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    finally:
        torch._dynamo.reset()
    return result
