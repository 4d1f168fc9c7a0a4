"""How close the grouped leaf GEMMs come to cuBLAS: the tree's routed part alone against batched matmuls.

A depth-3 tree with no shared part, leaves as wide as ``fff-distill --neurons-per-token 0.25`` makes them,
random weights (routing close to balanced). Its kernels (routing, counting sort, the two grouped GEMMs) are
timed against ``torch.bmm`` over the same leaves with the tokens split evenly among them and already in
leaf order: the rate the GEMMs could reach with perfect balance and no gather. Both as CUDA graphs, fp16.

    python benchmarks/fff/grouped_rate.py --device cuda [--sweep]

``--sweep`` times the tree again under other tile shapes for many rows per leaf (the choice
``triton_grouped._tiles`` makes above 64 rows per leaf), to choose that default on the device.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fff_block import SHAPES, SHARE, graphed_ms
from model_compress.fff.distill import FFFSettings
from model_compress.fff.kernels import triton_grouped
from model_compress.fff.kernels.triton_schedule import sort_rows
from model_compress.fff.tree import FastFeedForward


SWEEP = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3),
]


def sweep(tree: FastFeedForward, x: torch.Tensor, device: torch.device, repeats: int, label: str) -> None:
    """The tree's time under each SWEEP tile shape (for every row count: the rows per leaf here are many)."""
    default = triton_grouped._tiles
    try:
        for m, n, k, warps, stages in SWEEP:
            shape = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}
            triton_grouped._tiles = lambda rows, leaves, shape=shape: shape
            with torch.inference_mode():
                ms = graphed_ms(lambda: tree.hard_forward(x), device, repeats)
            print(f"sweep | {label} | {x.shape[0]} | {m}x{n}x{k} w{warps} s{stages} | {ms:.4f} ms", flush=True)
    finally:
        triton_grouped._tiles = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    device, dtype, depth = torch.device(args.device), torch.float16, 3
    print("| block | tokens | leaves x width | tree kernels ms | of which routing + sort ms | GEMMs TFLOP/s | bmm ms | bmm TFLOP/s | GEMMs / bmm time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (hidden, width, gated) in SHAPES.items():
        leaf_width = FFFSettings(depth=depth, neurons_per_token=SHARE).leaf_width_for(width)
        tree = FastFeedForward(hidden, depth, leaf_width, torch.nn.SiLU() if gated else torch.nn.GELU(), gated=gated,
                               in_bias=False, out_bias=False, dtype=dtype, device=device).eval()
        with torch.no_grad():
            for parameter in tree.parameters():
                parameter.normal_(0, hidden**-0.5)
        leaves = tree.num_leaves
        w_in, w_out = tree.leaf_in.transpose(1, 2), tree.leaf_out  # (leaves, hidden, width), (leaves, width, hidden)
        w_gate = tree.leaf_gate.transpose(1, 2) if gated else None
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            split = x[: tokens // leaves * leaves].view(leaves, tokens // leaves, hidden)

            def batched() -> torch.Tensor:
                up = torch.bmm(split, w_in)
                h = F.silu(torch.bmm(split, w_gate)) * up if gated else F.gelu(up)
                return torch.bmm(h, w_out)

            with torch.inference_mode():
                tree_ms = graphed_ms(lambda: tree.hard_forward(x), device, args.repeats)
                sort_ms = graphed_ms(lambda: sort_rows(tree, x), device, args.repeats)
                bmm_ms = graphed_ms(batched, device, args.repeats)
            flops = 2 * tokens * hidden * leaf_width * (3 if gated else 2)
            gemm_ms = tree_ms - sort_ms
            print(f"| {label} | {tokens} | {leaves} x {leaf_width} | {tree_ms:.4f} | {sort_ms:.4f} | {flops / gemm_ms / 1e9:.0f} | "
                  f"{bmm_ms:.4f} | {flops / bmm_ms / 1e9:.0f} | {gemm_ms / bmm_ms:.2f} |", flush=True)
            if args.sweep and tokens // leaves > 64:
                sweep(tree, x, device, args.repeats, label)


if __name__ == "__main__":
    main()
