"""Where the RPQ Linear's histogram form stops beating decode + GEMM, against the dense layer.

    python benchmarks/rpq/forward_dispatch.py [--device cpu|cuda] [--dtype float32|float16]

Times, per shape and token count, the dense ``F.linear`` (the original layer), the reference
(decode the weight, then ``F.linear``) and the histogram form, and prints ratios to dense. The
crossover sets ``kernels.HISTOGRAM_TOKENS_PER_PIECE``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from model_compress.rpq.kernels import forward as kernels

SHAPES = [(576, 576), (576, 1536), (1536, 576), (2048, 2048), (2048, 8192)]
TOKENS = [1, 4, 16, 64, 256]


def median_ms(fn, args: tuple, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in ms (synchronising on CUDA), after two warm-up calls."""
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--codebooks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"device={device} dtype={dtype} M={args.codebooks} K=256 torch={torch.__version__}")
    print(f"{'in->out':>12} {'tokens':>6} {'dense ms':>9} {'ref ms':>8} {'hist ms':>8} {'ref/dense':>9} {'hist/dense':>10}")
    for in_features, out_features in SHAPES:
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
        codebooks = torch.randn(args.codebooks, 256, out_features // args.codebooks, device=device, dtype=dtype)
        indices = torch.randint(0, 256, (args.codebooks, in_features), device=device, dtype=torch.uint8)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device=device, dtype=dtype)
            dense = median_ms(F.linear, (x, weight), device, args.repeats)
            ref = median_ms(kernels.linear_reference, (x, codebooks, indices, None), device, args.repeats)
            hist = median_ms(kernels.linear_histogram, (x, codebooks, indices, None), device, args.repeats)
            print(
                f"{in_features:>5}->{out_features:<6} {tokens:>6} {dense:>9.3f} {ref:>8.3f} {hist:>8.3f}"
                f" {ref / dense:>9.2f} {hist / dense:>10.2f}"
            )


if __name__ == "__main__":
    main()
