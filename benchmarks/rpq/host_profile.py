"""Where eager `generate` spends its host time, original vs compressed, on CUDA (batch 1: the GPU waits on Python).

    python benchmarks/rpq/host_profile.py FOLDER --source SOURCE [--tokens 64] [--top 30] [--out DIR]

Greedy ``generate`` of ``--tokens`` tokens after a 32-token prompt, for the original (``SOURCE``) and the compressed
folder, each under cProfile (its own overhead inflates every call alike, so compare the two, not with a timed run):
milliseconds per token, then the functions with the most own time and the package's functions by cumulative time,
per token. Before that, one unprofiled generate under ``torch.cuda.set_sync_debug_mode("warn")`` counts the
synchronisations the host makes per token (each one makes the host wait for the GPU, which eager decoding must not).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
import warnings
from pathlib import Path

import torch

UNPROFILED_RUNS = 5  # the unprofiled figure is their median


def load(role: str, folder: Path, source: str, dtype: torch.dtype, device: str):
    import model_compress
    from model_compress.core.sources import load_model, resolve_source

    if role == "original":
        model, _ = load_model(resolve_source(source), dtype)
        return model.to(device, dtype).eval()
    return model_compress.load(folder, device=device, dtype=dtype).eval()


def generate(model, prompt: torch.Tensor, tokens: int) -> None:
    model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    if prompt.is_cuda:
        torch.cuda.synchronize()


def syncs_per_token(model, prompt: torch.Tensor, tokens: int) -> tuple[float, str]:
    """Host-device synchronisations per generated token, and where the first one came from (CUDA only)."""
    if not prompt.is_cuda:
        return float("nan"), "-"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, prompt, tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    first = f"{syncs[0].filename}:{syncs[0].lineno}" if syncs else "-"
    return len(syncs) / tokens, first


def profile_role(role: str, model, prompt: torch.Tensor, tokens: int, top: int) -> str:
    generate(model, prompt, 8)  # warm-up: compiles, plans, caches
    timings = []
    for _ in range(UNPROFILED_RUNS):  # one run alone swung from 16 to 55 ms per token on the H100's host
        start = time.perf_counter()
        generate(model, prompt, tokens)
        timings.append((time.perf_counter() - start) / tokens * 1e3)
    plain_ms = statistics.median(timings)
    per_token_syncs, first_sync = syncs_per_token(model, prompt, tokens)
    profiler = cProfile.Profile()
    profiler.enable()
    generate(model, prompt, tokens)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total_ms = stats.total_tt / tokens * 1e3
    lines = [f"== {role}: {plain_ms:.2f} ms per token unprofiled (median of {len(timings)}), {total_ms:.2f} profiled; "
             f"{per_token_syncs:.1f} host-device syncs per token (first at {first_sync})"]
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buffer = io.StringIO()
        view = pstats.Stats(profiler, stream=buffer)
        view.sort_stats(key).print_stats(top)
        lines.append(f"-- by {title}, top {top} (seconds over {tokens} tokens)")
        lines.extend(line for line in buffer.getvalue().splitlines() if line.strip() and not line.startswith("   Ordered"))
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats("model_compress", top)
    lines.append(f"-- the package's functions by cumulative time, top {top}")
    lines.extend(line for line in buffer.getvalue().splitlines() if "model_compress" in line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a `compress rpq` output")
    parser.add_argument("--source", required=True, help="the original it was made from")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="write host_profile.txt here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    prompt = torch.randint(10, 1000, (1, 32), device=args.device)
    sections = []
    with torch.inference_mode():
        for role in ("original", "compressed"):
            model = load(role, args.folder, args.source, dtype, args.device)
            sections.append(profile_role(role, model, prompt, args.tokens, args.top))
            print(sections[-1], flush=True)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_profile.txt").write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
