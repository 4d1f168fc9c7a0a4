"""One FF block alone: dense vs FFF tree (hard inference forward), by shape, token count and depth.

First checks the tree's hard forward on this device against a plain per-token PyTorch walk (fp16,
bf16, both paths: gathered for fewer tokens than leaves, grouped otherwise), then times with CUDA
events (median of --repeats after warm-up) and prints a Markdown table with the ratio to dense.

Random weights and random inputs: routing is then close to balanced (the busiest leaf's share is
printed); distilled trees on real text route less evenly (fff_curve.py reports theirs).

    python benchmarks/fff/fff_block.py --device cuda
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F
from torch import nn

from model_compress.eval.latency import median_ms
from model_compress.fff.tree import FastFeedForward, per_token_reference

SHAPES = {"bert-base 768->3072": (768, 3072, False), "llama-ish 2048->8192 (gated)": (2048, 8192, True)}


class DenseBlock(nn.Module):
    """The plain transformer FF block (Llama's gated form where ``gated``)."""

    def __init__(self, hidden: int, width: int, gated: bool, dtype, device) -> None:
        super().__init__()
        options = {"dtype": dtype, "device": device}
        self.up = nn.Linear(hidden, width, bias=not gated, **options)
        self.gate = nn.Linear(hidden, width, bias=False, **options) if gated else None
        self.down = nn.Linear(width, hidden, bias=not gated, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


def random_tree(hidden: int, width: int, depth: int, gated: bool, dtype, device) -> FastFeedForward:
    tree = FastFeedForward(hidden, depth, width // 2**depth, nn.SiLU() if gated else nn.GELU(), gated=gated,
                           in_bias=not gated, out_bias=not gated, dtype=dtype, device=device)
    with torch.no_grad():
        for parameter in tree.parameters():
            parameter.normal_(0, hidden**-0.5)
    return tree.eval()


def check(device: torch.device) -> None:
    """Relative error of the hard forward against the per-token walk, on tokens whose route both agree on."""
    for dtype in (torch.float16, torch.bfloat16):
        for tokens in (3, 300):
            tree = random_tree(256, 1024, 4, True, dtype, device)
            x = torch.randn(tokens, 256, dtype=dtype, device=device)
            with torch.no_grad():
                got, expected = tree.hard_forward(x).float(), per_token_reference(tree, x)
            error = ((got - expected).norm() / expected.norm()).item()
            limit = 1e-2 if dtype == torch.float16 else 4e-2
            print(f"check {str(dtype)[6:]} tokens={tokens}: relative error {error:.2e} (limit {limit})")
            if error > limit:
                raise SystemExit("the hard forward disagrees with the per-token reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    check(device)
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    print("| block | tokens | dense ms | depth | leaves x width | FFF ms | FFF / dense | busiest leaf |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (hidden, width, gated) in SHAPES.items():
        dense = DenseBlock(hidden, width, gated, dtype, device)
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            with torch.inference_mode():
                dense_ms = median_ms(lambda: dense(x), device, 10, args.repeats)
                for depth in args.depths:
                    tree = random_tree(hidden, width, depth, gated, dtype, device)
                    tree_ms = median_ms(lambda: tree(x), device, 10, args.repeats)
                    busiest = torch.bincount(tree.route(x), minlength=tree.num_leaves).max().item() / tokens
                    print(f"| {label} | {tokens} | {dense_ms:.3f} | {depth} | {tree.num_leaves} x {tree.leaf_width} | "
                          f"{tree_ms:.3f} | {tree_ms / dense_ms:.2f} | {busiest:.0%} |", flush=True)


if __name__ == "__main__":
    main()
