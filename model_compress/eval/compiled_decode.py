"""Decode speed of a model under ``torch.compile``: what a user who compiles the model gets.

The same fixed-shape greedy step as ``graph_decode`` (static KV cache, inputs updated in place), with the model
compiled: on CUDA in ``reduce-overhead`` mode, which replays the compiled step from CUDA graphs; elsewhere in the
default mode. The first steps compile (not timed); then ``repeats`` blocks of ``steps`` steps are timed from the
end of the prompt, and the graph breaks the compiler met are counted (0 means one graph per step), and so are the
graphs inductor declined to replay from CUDA graphs (its "skipping cudagraphs" cases: a step it then launches kernel
by kernel, which a user would otherwise take for what compiling gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .graph_decode import CAPTURE_WARMUP, DecodeStep, GraphedDecode, median_ms_per_step


@dataclass
class CompiledDecode(GraphedDecode):
    """Median time of one compiled decode step of the whole batch, the graph breaks met, or why there is none."""

    graph_breaks: int | None = None
    cudagraph_skips: int | None = None


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def compiled_decode(model: nn.Module, prompt: torch.Tensor, steps: int, repeats: int) -> CompiledDecode:
    """Compile ``model`` and time ``repeats`` blocks of ``steps`` greedy decode steps of it."""
    device = prompt.device
    cuda = device.type == "cuda"
    result = CompiledDecode(batch=prompt.shape[0])
    torch._dynamo.reset()
    breaks_before, skips_before = _graph_breaks(), _cudagraph_skips()
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
            result.ms_per_step = median_ms_per_step(step, step.rewind, steps, repeats, device)
        result.peak_memory = torch.cuda.max_memory_allocated(device) if cuda else None
        result.graph_breaks = _graph_breaks() - breaks_before
        result.cudagraph_skips = _cudagraph_skips() - skips_before if cuda else None
    except Exception as error:  # noqa: BLE001 - a model the compiler cannot take: reported, the rest still measured
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    finally:
        torch._dynamo.reset()
    return result
