"""Where a prefill's time goes on CUDA, original vs compressed: wall time, kernel time, launches, host-device syncs,
the kernels that take the most device time, and the activations' dtype at the packed layers.

    python benchmarks/rpq/prefill_profile.py FOLDER --source SOURCE [--tokens 512] [--dtype bfloat16 float16] [--json FILE]

One prompt of ``--tokens`` random ids, batch 1, ``model(ids)`` eager as ``compress eval`` times it (median of 5 after 3
warm-ups), then one run under the torch profiler. The compressed folder runs twice per dtype: prompts of 4/5-bit
row tables on the tensor-core prompt kernel (the ``fused_prompts`` option on) and decoded for cuBLAS (off). Wall time
far above kernel time means the host (or a sync) sets the pace, not the kernels. With ``--decode N`` (default 16)
each model also runs greedy ``generate`` of N tokens at batch 1 under the profiler: per token, wall time, kernel time,
launches, and the host time of the CUDA runtime and driver calls (launches, pointer queries) by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections import Counter
from pathlib import Path

import torch
from host_profile import load

from model_compress.eval.latency import median_ms
from model_compress.rpq.kernels.config import options


def wall_ms(call, warmup: int = 3, repeats: int = 5) -> float:
    """Median ms of ``call`` by CUDA events, as ``compress eval`` times it."""
    return median_ms(call, torch.device("cuda"), warmup, repeats)


def syncs(call) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def kernel_profile(call, top: int) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels: Counter = Counter()
    counts: Counter = Counter()
    api: Counter = Counter()  # host time in CUDA runtime and driver calls (launches, pointer queries), by name
    api_counts: Counter = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            kernels[name] += event.time_range.elapsed_us()
            counts[name] += 1
        elif event.name.startswith(("cuda", "cu")) and not event.name.startswith("cudnn"):
            api[event.name] += event.time_range.elapsed_us()
            api_counts[event.name] += 1
    return {"kernel_ms": sum(kernels.values()) / 1e3, "launches": sum(counts.values()),
            "top": [(name, round(us / 1e3, 3), counts[name]) for name, us in kernels.most_common(top)],
            "host_api": [(name, round(us / 1e3, 3), api_counts[name]) for name, us in api.most_common(6)]}


def activation_dtypes(model, call) -> dict:
    """The dtypes of the inputs reaching the packed layers (which route a prompt takes depends on it)."""
    seen: Counter = Counter()
    handles = [module.register_forward_pre_hook(lambda m, args: seen.update([str(args[0].dtype)]) if args else None)
               for module in model.modules() if type(module).__name__.startswith("RPQ")]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return dict(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--source", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--decode", type=int, default=16,
                        help="also profile greedy generate of this many tokens after a 32-token prompt, batch 1 (0: skip)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for role in ("original", "compressed"):
            model = load(role, args.folder, args.source, dtype, "cuda")
            ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")

            def call(model=model, ids=ids):
                with torch.inference_mode():
                    model(input_ids=ids)

            prompt = ids[:, :32]

            def decode(model=model, prompt=prompt):
                with torch.inference_mode():
                    model.generate(prompt, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False, pad_token_id=0)

            if args.decode:
                row = {"variant": f"{role}, decode", "dtype": dtype_name, "tokens": args.decode, "wall_ms": wall_ms(decode, 1, 3),
                       **kernel_profile(decode, args.top)}
                rows.append(row)
                print(f"== {dtype_name} {role} decode: {row['wall_ms'] / args.decode:.2f} ms per token wall, kernels "
                      f"{row['kernel_ms'] / args.decode:.2f} ms in {row['launches'] / args.decode:.0f} launches per token; host API "
                      + ", ".join(f"{name} {ms / args.decode:.2f} ms / {n / args.decode:.0f}" for name, ms, n in row["host_api"]),
                      flush=True)
            variants = [("original", contextlib.nullcontext)] if role == "original" else [
                ("compressed, prompt kernel", lambda: options.using(fused_prompts=True)),
                ("compressed, decode + cuBLAS", lambda: options.using(fused_prompts=False))]
            for name, context in variants:
                with context():
                    row = {"variant": name, "dtype": dtype_name, "wall_ms": wall_ms(call), "syncs": syncs(call),
                           **kernel_profile(call, args.top)}
                    if role == "compressed":
                        row["activation_dtypes"] = activation_dtypes(model, call)
                rows.append(row)
                print(f"== {dtype_name} {name}: wall {row['wall_ms']:.2f} ms, kernels {row['kernel_ms']:.2f} ms in {row['launches']} "
                      f"launches, {row['syncs']} syncs" + (f", inputs {row['activation_dtypes']}" if "activation_dtypes" in row else ""),
                      flush=True)
                for kernel, ms, count in row["top"]:
                    print(f"   {ms:8.3f} ms {count:5d}x {kernel}", flush=True)
                print("   host API: " + ", ".join(f"{name} {ms:.2f} ms / {n}" for name, ms, n in row["host_api"]), flush=True)
            del model
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
