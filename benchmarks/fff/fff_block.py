"""One FF block alone: dense vs FFF tree (hard inference forward), both as CUDA graphs, by shape and token count.

The trees spend a quarter of the block's neurons per token, as `compress fff-distill --neurons-per-token
0.25` builds them: depth 3 with the shared part and one leaf, and depth 4 with two leaves per token. Each
is timed on its kernels and on the eager PyTorch path (the reference, what runs without Triton). First
the kernels are checked on this device against the eager forward (fp16, bf16, 1 / 7 / 300 tokens), then
times are the median of --repeats replays of a captured graph (after warm-up), with the ratio to dense.
The grouped kernels' routing and counting sort (what runs before their GEMMs) is also timed alone; at
one token with one leaf the decode kernels run instead and need no sort.

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
from model_compress.fff.distill import FFFSettings
from model_compress.fff.kernels import fast_hard_forward
from model_compress.fff.tree import FastFeedForward

SHAPES = {"bert-base 768->3072": (768, 3072, False), "llama-style 2048->8192 (SwiGLU)": (2048, 8192, True)}
TREES = {"depth 3, shared + 1 leaf": (3, 1), "depth 4, shared + 2 leaves": (4, 2)}
SHARE = 0.25


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


def random_tree(hidden: int, width: int, depth: int, top: int, gated: bool, dtype, device) -> FastFeedForward:
    """A tree of the shape fff-distill builds at SHARE of ``width`` neurons per token, random weights."""
    settings = FFFSettings(depth=depth, neurons_per_token=SHARE, leaves_per_token=top)
    tree = FastFeedForward(hidden, depth, settings.leaf_width_for(width), nn.SiLU() if gated else nn.GELU(), gated=gated,
                           in_bias=not gated, out_bias=not gated, shared_width=settings.shared_width_for(width),
                           leaves_per_token=top, dtype=dtype, device=device)
    with torch.no_grad():
        for parameter in tree.parameters():
            parameter.normal_(0, hidden**-0.5)
    return tree.eval()


def check(device: torch.device) -> None:
    """The kernels' largest error against the eager forward, relative to the output's largest value."""
    for dtype in (torch.float16, torch.bfloat16):
        for top in (1, 2):
            for tokens in (1, 7, 300):
                tree = random_tree(256, 1024, 3 + top - 1, top, True, dtype, device)
                x = torch.randn(tokens, 256, dtype=dtype, device=device)
                with torch.inference_mode():
                    got, expected = fast_hard_forward(tree, x), tree.eager_hard_forward(x)
                error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
                limit = 4e-3 if dtype == torch.float16 else 3e-2
                print(f"check {str(dtype)[6:]} leaves/token={top} tokens={tokens}: max error {error:.1e} of the largest output (limit {limit})")
                if error > limit:
                    raise SystemExit("the kernels disagree with the eager forward")


def graphed_ms(call, device: torch.device, repeats: int) -> float:
    """Median ms of replaying ``call`` captured in a CUDA graph (the way decoding and serving run it)."""
    for _ in range(3):
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return median_ms(graph.replay, device, 10, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096])
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16
    from model_compress.fff.kernels.triton_schedule import sort_rows  # Triton: a GPU machine

    check(device)
    print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    print("| block | tokens | dense ms | tree | shared + leaves x width | kernels ms | kernels / dense | of which routing + sort ms | eager ms | eager / dense | busiest leaf |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, (hidden, width, gated) in SHAPES.items():
        dense = DenseBlock(hidden, width, gated, dtype, device)
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            with torch.inference_mode():
                dense_ms = graphed_ms(lambda: dense(x), device, args.repeats)
                for name, (depth, top) in TREES.items():
                    tree = random_tree(hidden, width, depth, top, gated, dtype, device)
                    kernel_ms = graphed_ms(lambda: tree.hard_forward(x), device, args.repeats)
                    sort_ms = graphed_ms(lambda: sort_rows(tree, x), device, args.repeats)
                    eager_ms = median_ms(lambda: tree.eager_hard_forward(x), device, 5, max(10, args.repeats // 5))  # host syncs: no graph
                    busiest = torch.bincount(tree.routes(x).flatten(), minlength=tree.num_leaves).max().item() / tokens
                    print(f"| {label} | {tokens} | {dense_ms:.4f} | {name} | {tree.shared_width} + {tree.num_leaves} x {tree.leaf_width} | "
                          f"{kernel_ms:.4f} | {kernel_ms / dense_ms:.2f} | {sort_ms:.4f} | {eager_ms:.4f} | {eager_ms / dense_ms:.2f} | {busiest:.0%} |", flush=True)


if __name__ == "__main__":
    main()
