"""Where a compiled decode step's device time goes, original vs compressed: the step `compress eval --compile` times.

    python benchmarks/rpq/compiled_step_profile.py FOLDER --source SOURCE [--batch 1 16] [--label NAME] [--json FILE]
        [--mode compiled|graphed] [--host-profile PREFIX]

Each model is compiled as ``compress eval --compile`` compiles it (``reduce-overhead``: the step replayed from CUDA
graphs, static cache, fixed shapes), its step timed (median of 3 blocks of 64 steps, CUDA events), then 16 steps run
under the torch profiler: the kernels by device time per step and their launches per step, and the host's launch
calls per step; then the host time per step without waiting for the GPU (above the device time: the host sets the
pace), and with ``--host-profile`` the host's functions by own time. ``--mode graphed``: the eager step captured in one
CUDA graph instead (``compress eval``'s graphed decode), for comparison. The runtime options come
from the environment as for any user (``MODEL_COMPRESS_ROTATE_IN_LOAD=0``, ``MODEL_COMPRESS_PROGRAMMATIC_LAUNCH=1``):
run the script once per setting, with ``--label`` naming it, to compare settings on the same folder.
``--original 0`` leaves the original out (it does not depend on the options).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from collections import Counter
from pathlib import Path

import torch
from host_profile import load

from model_compress.eval.graph_decode import CAPTURE_WARMUP, DecodeStep, captured_graph, median_ms_per_step
from model_compress.rpq.kernels.config import options

STEPS = 64
PROFILED_STEPS = 16


HOST_CALLS = ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def step_kernels(step: DecodeStep, run_step, top: int) -> dict:
    """Device time and launches per step, by kernel, over PROFILED_STEPS steps; the host's launch calls per step (a step
    replayed from CUDA graphs makes graph launches, not kernel launches)."""
    step.rewind()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            run_step()
        torch.cuda.synchronize()
    time_us: Counter = Counter()
    launches: Counter = Counter()
    host: Counter = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:100]
            time_us[name] += event.time_range.elapsed_us() / PROFILED_STEPS
            launches[name] += 1 / PROFILED_STEPS
        elif event.name in HOST_CALLS:
            host[event.name] += 1 / PROFILED_STEPS
    return {"host_launch_calls_per_step": {name: round(count, 1) for name, count in host.items()},
            "kernel_us_per_step": round(sum(time_us.values()), 1), "launches_per_step": round(sum(launches.values()), 1),
            "top": [(name, round(us, 2), round(launches[name], 2)) for name, us in time_us.most_common(top)]}


def host_ms_per_step(step: DecodeStep, run_step, profiler: cProfile.Profile | None = None) -> float:
    """Host time of one step, not waiting for the GPU (its queue holds far more than these steps' launches): a step
    whose host time exceeds its device time runs at the host's pace. ``profiler``: enabled over the steps."""
    step.rewind()
    torch.cuda.synchronize()
    began = time.perf_counter()
    if profiler:
        profiler.enable()
    for _ in range(PROFILED_STEPS):
        run_step()
    if profiler:
        profiler.disable()
    host = (time.perf_counter() - began) * 1e3 / PROFILED_STEPS
    torch.cuda.synchronize()
    return host


def write_host_profile(step: DecodeStep, run_step, path: Path) -> None:
    """The steps' host functions by own time (cProfile), to ``path``."""
    profiler = cProfile.Profile()
    host_ms_per_step(step, run_step, profiler)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    path.write_text(text.getvalue())


def decode_step(model, batch: int, mode: str, top: int, host_profile: Path | None = None) -> dict:
    """Time and profile ``model``'s one-token step at ``batch``: compiled as ``compress eval --compile`` compiles it
    (``mode`` "compiled"), or eager and captured in one CUDA graph as ``compress eval`` replays it ("graphed")."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    device = next(model.parameters()).device
    prompt = torch.randint(3, model.config.vocab_size, (batch, 32), device=device)
    with torch.inference_mode():
        step = DecodeStep(model, prompt, STEPS + PROFILED_STEPS)
        step.prefill()
        if mode == "compiled":
            step.model = torch.compile(model, mode="reduce-overhead", dynamic=False)
            for _ in range(CAPTURE_WARMUP):
                step()
            run_step = step
        else:
            run_step = captured_graph(step, device, CAPTURE_WARMUP).replay
        ms = median_ms_per_step(run_step, step.rewind, STEPS, 3, device)
        profile = step_kernels(step, run_step, top)
        host_ms = host_ms_per_step(step, run_step)
        if host_profile:
            write_host_profile(step, run_step, host_profile)

    cudagraph_counters = {key: value for key, value in counters["inductor"].items() if "cudagraph" in key}
    torch._dynamo.reset()
    return {"inductor_cudagraph_counters": cudagraph_counters, "host_ms_per_step": round(host_ms, 4),
            "ms_per_step": round(ms, 4), "tokens_per_s": round(batch * 1e3 / ms, 1), **profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--source", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--label", default="default options")
    parser.add_argument("--mode", choices=["compiled", "graphed"], default="compiled")
    parser.add_argument("--original", type=int, default=1)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--json")
    parser.add_argument("--host-profile", help="write each step's host functions by own time (cProfile) to PREFIX.ROLE.bN.txt")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    result = {"label": args.label, "mode": args.mode, "options": repr(options.current()), "device": torch.cuda.get_device_name(), "models": {}}
    for role in (("original", "compressed") if args.original else ("compressed",)):
        model = load(role, args.folder, args.source, dtype, "cuda")
        result["models"][role] = {
            str(batch): decode_step(model, batch, args.mode, args.top,
                                    Path(f"{args.host_profile}.{role}.b{batch}.txt") if args.host_profile else None)
            for batch in args.batch}
        del model
        torch.cuda.empty_cache()
    for role, by_batch in result["models"].items():
        for batch, figures in by_batch.items():
            print(f"== {args.label} ({args.mode}) | {role} batch {batch}: {figures['ms_per_step']:.3f} ms/step "
                  f"(host {figures['host_ms_per_step']:.3f} ms/step) "
                  f"({figures['tokens_per_s']:.0f} tok/s), kernels {figures['kernel_us_per_step']:.0f} us/step, "
                  f"{figures['launches_per_step']:.0f} launches/step; host calls/step {figures['host_launch_calls_per_step']}; "
                  f"inductor {figures['inductor_cudagraph_counters']}")
            for name, us, count in figures["top"]:
                print(f"   {us:9.2f} us  x{count:6.2f}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
