"""Where the one-token (decode) kernels stop beating the grouped ones: both timed on the same trees, as CUDA graphs.

The decode kernels read each token's leaf on its own (no sort, four launches); the grouped ones read each
leaf once for all its tokens (a sort, then two GEMMs). ``triton_decode.MAX_TOKENS`` is where the first stop
paying; this prints both times by token count, for the block shapes of ``fff_block.py``, one leaf per token.

    python benchmarks/fff/decode_crossover.py --device cuda
"""

from __future__ import annotations

import argparse

import torch

from fff_block import SHAPES, graphed_ms, random_tree
from model_compress.fff.kernels import triton_decode, triton_grouped
from model_compress.fff.kernels.activation import kernel_activation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    device = torch.device(args.device)
    print("| block | tokens | decode ms | grouped ms | decode / grouped |")
    print("|---|---|---|---|---|")
    for label, (hidden, width, gated) in SHAPES.items():
        tree = random_tree(hidden, width, 3, 1, gated, torch.float16, device)
        act = kernel_activation(tree.activation)
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, dtype=torch.float16, device=device)
            with torch.inference_mode():
                decode = graphed_ms(lambda: triton_decode.decode_forward(tree, x, act), device, args.repeats)
                grouped = graphed_ms(lambda: triton_grouped.grouped_forward(tree, x, act), device, args.repeats)
            print(f"| {label} | {tokens} | {decode:.4f} | {grouped:.4f} | {decode / grouped:.2f} |", flush=True)


if __name__ == "__main__":
    main()
