"""Where a compiled decode step's device time goes, original vs compressed: the step `compress eval --compile` times.

    python benchmarks/rpq/compiled_step_profile.py FOLDER --source SOURCE [--batch 1 16] [--label NAME] [--json FILE]

Each model is compiled as ``compress eval --compile`` compiles it (``reduce-overhead``: the step replayed from CUDA
graphs, static cache, fixed shapes), its step timed (median of 3 blocks of 64 steps, CUDA events), then 16 steps run
under the torch profiler: the kernels by device time per step and their launches per step. The runtime options come
from the environment as for any user (``MODEL_COMPRESS_ROTATE_IN_LOAD=0``, ``MODEL_COMPRESS_PROGRAMMATIC_LAUNCH=1``):
run the script once per setting, with ``--label`` naming it, to compare settings on the same folder.
``--original 0`` leaves the original out (it does not depend on the options).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from host_profile import load

from model_compress.eval.graph_decode import CAPTURE_WARMUP, DecodeStep, median_ms_per_step
from model_compress.rpq.kernels.config import options

STEPS = 64
PROFILED_STEPS = 16


def step_kernels(step: DecodeStep, top: int) -> dict:
    """Device time and launches per step, by kernel, over PROFILED_STEPS steps."""
    step.rewind()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
    time_us: Counter = Counter()
    launches: Counter = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:100]
            time_us[name] += event.time_range.elapsed_us() / PROFILED_STEPS
            launches[name] += 1 / PROFILED_STEPS
    return {"kernel_us_per_step": round(sum(time_us.values()), 1), "launches_per_step": round(sum(launches.values()), 1),
            "top": [(name, round(us, 2), round(launches[name], 2)) for name, us in time_us.most_common(top)]}


def compiled_step(model, batch: int, top: int) -> dict:
    """Compile ``model`` as ``compress eval --compile`` does and time and profile its one-token step at ``batch``."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    prompt = torch.randint(3, model.config.vocab_size, (batch, 32), device=device)
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    with torch.inference_mode():
        step = DecodeStep(model, prompt, STEPS + PROFILED_STEPS)
        step.prefill()
        step.model = compiled
        for _ in range(CAPTURE_WARMUP):
            step()
        ms = median_ms_per_step(step, step.rewind, STEPS, 3, device)
        profile = step_kernels(step, top)
    torch._dynamo.reset()
    return {"ms_per_step": round(ms, 4), "tokens_per_s": round(batch * 1e3 / ms, 1), **profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--source", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--label", default="default options")
    parser.add_argument("--original", type=int, default=1)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    result = {"label": args.label, "options": repr(options.current()), "device": torch.cuda.get_device_name(), "models": {}}
    for role in (("original", "compressed") if args.original else ("compressed",)):
        model = load(role, args.folder, args.source, dtype, "cuda")
        result["models"][role] = {str(batch): compiled_step(model, batch, args.top) for batch in args.batch}
        del model
        torch.cuda.empty_cache()
    for role, by_batch in result["models"].items():
        for batch, figures in by_batch.items():
            print(f"== {args.label} | {role} batch {batch}: {figures['ms_per_step']:.3f} ms/step "
                  f"({figures['tokens_per_s']:.0f} tok/s), kernels {figures['kernel_us_per_step']:.0f} us/step, "
                  f"{figures['launches_per_step']:.0f} launches/step")
            for name, us, count in figures["top"]:
                print(f"   {us:9.2f} us  x{count:6.2f}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
