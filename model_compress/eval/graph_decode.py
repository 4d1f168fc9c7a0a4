"""Decode speed with the host taken out: one greedy step captured in a CUDA graph, then replayed.

Eager ``generate`` on a small model at batch 1 times Python and kernel launches more than the GPU:
both models come out at the same tokens/s whatever their weights cost. Serving stacks (vLLM,
TensorRT-LLM, transformers' static-cache compile) replay CUDA graphs instead; this does the same
for both models, so the figure is the device's time per token.

The step runs over a static KV cache with fixed-shape inputs updated in place on the device
(next token, position, attention mask), so it has no host sync and can be captured. Each timed
block starts again from the end of the prompt and generates ``steps`` tokens, like ``generate``
with that many new tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

CAPTURE_WARMUP = 3


@dataclass
class GraphedDecode:
    """Median device time of one decode step of the whole batch, or why there is none."""

    batch: int
    ms_per_step: float | None = None
    peak_memory: int | None = None
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.ms_per_step is None else self.batch * 1e3 / self.ms_per_step


class DecodeStep:
    """One greedy decode step on fixed tensors: feed ``token`` at ``position``, write the next token back."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, steps: int) -> None:
        from transformers import StaticCache

        self.model = model
        self.prompt = prompt
        self.prompt_len = prompt.shape[1]
        self.max_len = self.prompt_len + steps + CAPTURE_WARMUP + 1
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        batch, device = prompt.shape[0], prompt.device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, self.max_len, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None

    def prefill(self) -> None:
        """Run the prompt through the cache and set the first token, position and mask."""
        positions = torch.arange(self.prompt_len, device=self.prompt.device)
        logits = self.model(
            input_ids=self.prompt,
            past_key_values=self.cache,
            use_cache=True,
            position_ids=positions[None].expand(self.prompt.shape[0], -1),
            cache_position=positions,
        ).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.rewind()

    def rewind(self) -> None:
        """Back to the first generated position (device ops only; the cache past it is masked out).

        Static cache layers keep their own write position (``cumulative_length``, a device tensor
        the captured graph advances): it goes back too.
        """
        self.position.fill_(self.prompt_len)
        self.mask.zero_()
        self.mask[:, : self.prompt_len] = 1
        for layer in getattr(self.cache, "layers", ()):
            written = getattr(layer, "cumulative_length", None)
            if isinstance(written, torch.Tensor):
                written.fill_(self.prompt_len)
            elif isinstance(written, int):
                layer.cumulative_length = self.prompt_len

    def __call__(self) -> torch.Tensor:
        self.mask.index_fill_(1, self.position, 1)
        self.logits = self.model(
            input_ids=self.token,
            past_key_values=self.cache,
            use_cache=True,
            position_ids=self.position[None].expand(self.token.shape[0], 1),
            cache_position=self.position,
            attention_mask=self.mask,
        ).logits
        self.token.copy_(self.logits[:, -1:].argmax(-1))
        self.position.add_(1)
        return self.token


def median_ms_per_step(run_step, rewind, steps: int, repeats: int, device: torch.device) -> float:
    """Median over ``repeats`` blocks (after one warm-up block) of ``steps`` calls of ``run_step``, each block from the
    end of the prompt (``rewind``): CUDA events on a GPU, the wall clock elsewhere."""
    times = []
    for _ in range(repeats + 1):
        rewind()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                run_step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / steps)
        else:
            began = time.perf_counter()
            for _ in range(steps):
                run_step()
            times.append((time.perf_counter() - began) * 1e3 / steps)
    return statistics.median(times[1:])


def captured_graph(call: Callable[[], object], device: torch.device, warmup: int) -> torch.cuda.CUDAGraph:
    """``call`` captured in a CUDA graph, after ``warmup`` runs on a side stream (what capture needs: the allocator's
    and the libraries' first-call work done outside it). Raises RuntimeError where the call syncs with the host."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def graphed_decode(model: nn.Module, prompt: torch.Tensor, steps: int, repeats: int) -> GraphedDecode:
    """Capture one decode step of ``model`` (on CUDA) and time ``repeats`` blocks of ``steps`` replays."""
    device = prompt.device
    result = GraphedDecode(batch=prompt.shape[0])
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            step = DecodeStep(model, prompt, steps)
            step.prefill()
            graph = captured_graph(step, device, CAPTURE_WARMUP)
            result.ms_per_step = median_ms_per_step(graph.replay, step.rewind, steps, repeats, device)
        result.peak_memory = torch.cuda.max_memory_allocated(device)
        del graph, step
    except RuntimeError as error:  # a model whose forward syncs with the host cannot be captured
        result.error = str(error).splitlines()[0][:200]
    return result
