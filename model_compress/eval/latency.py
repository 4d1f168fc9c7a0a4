"""Prefill latency, decode throughput and peak device memory, timed the same way for both models.

CUDA: CUDA events around each call, after warm-up runs, median of ``repeats``; the peak allocator
memory of each measurement (reset before it, so it includes the resident weights). CPU: wall
clocks, the same medians, no memory peak (the CPU allocator keeps no resettable peak), and the
figures are indicative only.

FF blocks: one more set of prefill runs with hooks stamping (CUDA events / clocks) the entry and
exit of every feed-forward block (dense, RPQ or FFF tree), for their share of the forward time.

Decode: ``generate`` (greedy, KV cache on, exactly ``new_tokens`` tokens: no early stop) from a
short prompt; the time of a 1-token generate (prefill + first token) is subtracted, so tokens/s
counts only the ``new_tokens - 1`` cached decode steps, for every sequence of the batch. On CUDA
also with one decode step captured in a CUDA graph and replayed (``graph_decode``): the device's
time per token without the host's, which is what a serving stack gets; and the prefill likewise (``graph_prefill``).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.sources import context_length
from ..core.methods import ff_timing_spans, fixed_shortlists, release_workspaces
from .compiled_decode import compiled_decode
from .graph_decode import graphed_decode
from .graph_prefill import graphed_forward_ms
from .placement import model_devices

DECODE_PROMPT = 32


@dataclass
class LatencySettings:
    prompt_len: int = 512
    new_tokens: int = 128
    decode_batches: tuple[int, ...] = (1, 16)
    warmup: int = 2
    repeats: int = 5
    compiled: bool = False  # also time decoding with the model under torch.compile (compiled_decode)


@dataclass
class LatencyResult:
    """Medians in ms / tokens per second, with the shapes actually used and the peaks."""

    timer: str
    prefill_tokens: int
    prefill_ms: float
    new_tokens: int | None = None
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    peak_memory: dict[str, int | None] = field(default_factory=dict)
    ff_blocks: int = 0
    ff_ms: float | None = None  # time inside the FF blocks during a prefill (hooked run)
    ff_share: float | None = None  # ... over that run's whole forward time
    prefill_graphed_ms: float | None = None  # the same prefill replayed from a CUDA graph: its device time
    prefill_graphed_error: str | None = None
    graph_decode_tokens_per_s: dict[int, float | None] = field(default_factory=dict)
    graph_decode_errors: dict[int, str] = field(default_factory=dict)
    compiled_decode_tokens_per_s: dict[int, float | None] = field(default_factory=dict)
    compiled_decode_graph_breaks: dict[int, int | None] = field(default_factory=dict)
    compiled_decode_cudagraph_skips: dict[int, int | None] = field(default_factory=dict)  # CUDA: graphs not replayed
    compiled_decode_errors: dict[int, str] = field(default_factory=dict)
    # a head answering from an index: of the positions graphed or compiled decode answered from fixed shortlists, the
    # share not certified (their token may differ from the dense argmax)
    fixed_head_uncertified: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "timer": self.timer,
            "prefill_tokens": self.prefill_tokens,
            "prefill_ms": self.prefill_ms,
            "ff_blocks": self.ff_blocks,
            "ff_prefill_ms": self.ff_ms,
            "ff_prefill_share": self.ff_share,
            "prefill_graphed_ms": self.prefill_graphed_ms,
            "prefill_graphed_error": self.prefill_graphed_error,
            "decode_new_tokens": self.new_tokens,
            "decode_tokens_per_s": {str(batch): value for batch, value in self.decode_tokens_per_s.items()},
            "graph_decode_tokens_per_s": {str(batch): value for batch, value in self.graph_decode_tokens_per_s.items()},
            "graph_decode_errors": {str(batch): value for batch, value in self.graph_decode_errors.items()},
            "compiled_decode_tokens_per_s": {str(batch): value for batch, value in self.compiled_decode_tokens_per_s.items()},
            "compiled_decode_graph_breaks": {str(batch): value for batch, value in self.compiled_decode_graph_breaks.items()},
            "compiled_decode_cudagraph_skips": {str(batch): value for batch, value in self.compiled_decode_cudagraph_skips.items()},
            "compiled_decode_errors": {str(batch): value for batch, value in self.compiled_decode_errors.items()},
            "fixed_head_uncertified": {str(batch): value for batch, value in self.fixed_head_uncertified.items()},
            "peak_memory_bytes": self.peak_memory,
        }


def release_device_memory(device: torch.device) -> None:
    """Free what a model measured before left allocated, so the next one's peaks are its own.

    Besides unreachable tensors: cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it
    ran on until told otherwise, and the RPQ kernels keep a split-K workspace. Left in place, the
    second model measured would carry the first one's.
    """
    gc.collect()
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    clear_cublas = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_cublas is not None:
        clear_cublas()
    release_workspaces()
    torch.cuda.empty_cache()


class PeakMemory:
    """Peak allocated device memory over a block (None on a CPU); over several GPUs (a spread model), the sum of each
    one's peak."""

    def __init__(self, device: torch.device, devices: list[torch.device] | None = None) -> None:
        self.device = device
        self.devices = [d for d in (devices or [device]) if d.type == "cuda"]
        self.peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        for device in self.devices:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        return self

    def __exit__(self, *exc) -> None:
        if self.devices:
            for device in self.devices:
                torch.cuda.synchronize(device)
            self.peak = sum(torch.cuda.max_memory_allocated(device) for device in self.devices)


def median_ms(call: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              devices: list[torch.device] | None = None) -> float:
    """Median milliseconds of ``call`` after ``warmup`` untimed runs (CUDA events on a GPU; a wall clock between
    synchronisations of every GPU of ``devices`` where a model is spread over several, whose events time one)."""
    for _ in range(warmup):
        call()
    times = []
    spread = devices is not None and len(devices) > 1
    for _ in range(repeats):
        if spread:
            _synchronize(devices)
            began = time.perf_counter()
            call()
            _synchronize(devices)
            times.append((time.perf_counter() - began) * 1e3)
        elif device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            call()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def _synchronize(devices: list[torch.device]) -> None:
    for device in devices:
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module,
    ids: torch.Tensor,
    settings: LatencySettings,
    generates: bool,
    on_step: Callable[[str], None] | None = None,
) -> LatencyResult:
    """Prefill at batch 1, then (for generating models) decode at each batch size, on real text ``ids`` (1-D)."""
    devices = model_devices(model)
    device, spread = devices[0], len(devices) > 1
    on_step = on_step or (lambda name: None)
    context = context_length(model.config)
    prefill_len = min(settings.prompt_len, ids.numel(), context or settings.prompt_len)
    prefill_input = ids[None, :prefill_len].to(device)
    kwargs = {"use_cache": False} if generates else {}
    timer = f"wall-clock, {len(devices)} GPUs synchronised" if spread else "cuda-events" if device.type == "cuda" else "wall-clock"

    def prefill():
        return model(input_ids=prefill_input, **kwargs)

    with torch.inference_mode(), PeakMemory(device, devices) as peak:
        prefill_ms = median_ms(prefill, device, settings.warmup, settings.repeats, devices)
    result = LatencyResult(timer, prefill_len, prefill_ms, peak_memory={"prefill": peak.peak})
    if device.type == "cuda" and not spread:  # a graph captures one device's work
        result.prefill_graphed_ms, result.prefill_graphed_error = graphed_forward_ms(prefill, device, settings.repeats)
    spans = ff_timing_spans(model) if not spread else []  # the hooks' CUDA events would time one GPU's stream
    if spans:
        with torch.inference_mode():
            result.ff_ms, result.ff_share = block_time(prefill, spans, device, settings)
        result.ff_blocks = len(spans)
    on_step("prefill")
    if not generates:
        return result

    new_tokens = settings.new_tokens
    prompt_len = min(DECODE_PROMPT, ids.numel())  # a text shorter than the decode prompt is used whole
    if context is not None:
        new_tokens = max(2, min(new_tokens, context - prompt_len))
    result.new_tokens = new_tokens
    rows = ids[: (ids.numel() // prompt_len) * prompt_len].view(-1, prompt_len)
    for batch in settings.decode_batches:
        prompt = rows[torch.arange(batch) % rows.shape[0]].to(device)  # distinct text per row while it lasts
        with torch.inference_mode(), PeakMemory(device, devices) as peak:
            full = median_ms(lambda: _generate(model, prompt, new_tokens), device, settings.warmup, settings.repeats, devices)
            first = median_ms(lambda: _generate(model, prompt, 1), device, settings.warmup, settings.repeats, devices)
        result.decode_tokens_per_s[batch] = batch * (new_tokens - 1) / max(full - first, 1e-6) * 1e3
        result.peak_memory[f"decode_batch_{batch}"] = peak.peak
        if spread:  # a CUDA graph captures one device's work, and the compiled decode replays one
            result.graph_decode_errors[batch] = f"the model is spread over {len(devices)} GPUs"
            if settings.compiled:
                result.compiled_decode_errors[batch] = f"the model is spread over {len(devices)} GPUs"
            on_step(f"decode batch {batch}")
            continue
        fixed_shortlists(model, True)  # an indexed head: fixed shortlists, which graphs capture and compiling traces
        try:
            _graphed_and_compiled(model, prompt, new_tokens, batch, settings, device, result)
        finally:
            counts = fixed_shortlists(model, False)
        if counts is not None and counts["positions"]:
            result.fixed_head_uncertified[batch] = counts["uncertified"] / counts["positions"]
        on_step(f"decode batch {batch}")
    return result


def _graphed_and_compiled(model: nn.Module, prompt: torch.Tensor, new_tokens: int, batch: int, settings: LatencySettings,
                          device: torch.device, result: LatencyResult) -> None:
    """Decode replayed from a CUDA graph (on CUDA) and compiled (when asked), into ``result``."""
    if device.type == "cuda":
        graphed = graphed_decode(model, prompt, new_tokens, settings.repeats)
        result.graph_decode_tokens_per_s[batch] = graphed.tokens_per_s
        result.peak_memory[f"graph_decode_batch_{batch}"] = graphed.peak_memory
        if graphed.error:
            result.graph_decode_errors[batch] = graphed.error
    if settings.compiled:
        compiled = compiled_decode(model, prompt, new_tokens, settings.repeats)
        result.compiled_decode_tokens_per_s[batch] = compiled.tokens_per_s
        result.compiled_decode_graph_breaks[batch] = compiled.graph_breaks
        result.compiled_decode_cudagraph_skips[batch] = compiled.cudagraph_skips
        result.peak_memory[f"compiled_decode_batch_{batch}"] = compiled.peak_memory
        if compiled.error:
            result.compiled_decode_errors[batch] = compiled.error


def block_time(
    call: Callable[[], object], spans: list[tuple[nn.Module, nn.Module]], device: torch.device, settings: LatencySettings
) -> tuple[float, float]:
    """Medians of (ms inside the spans, their share of the whole call), from hooks that stamp each span's ends."""
    stamps: list = []

    def stamp(*_) -> None:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            stamps.append(event)
        else:
            stamps.append(time.perf_counter())

    handles = []
    for first, last in spans:
        handles.append(first.register_forward_pre_hook(stamp))
        handles.append(last.register_forward_hook(stamp))
    inside, shares = [], []
    try:
        for run in range(settings.warmup + settings.repeats):
            stamps.clear()
            stamp()
            call()
            stamp()
            if run < settings.warmup:
                continue
            if device.type == "cuda":
                stamps[-1].synchronize()
                elapsed = [a.elapsed_time(b) for a, b in zip(stamps[1:-1:2], stamps[2:-1:2])]
                total = stamps[0].elapsed_time(stamps[-1])
            else:
                elapsed = [(b - a) * 1e3 for a, b in zip(stamps[1:-1:2], stamps[2:-1:2])]
                total = (stamps[-1] - stamps[0]) * 1e3
            inside.append(sum(elapsed))
            shares.append(sum(elapsed) / total)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(inside), statistics.median(shares)


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=_pad_id(model.config),
    )
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


def _pad_id(config) -> int:
    """generate wants a pad id even when nothing is padded; models without one use their end-of-text id."""
    for candidate in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return candidate
    return 0
