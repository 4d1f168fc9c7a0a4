"""What the tree kernels share: the activations, the leaf a tile belongs to, the launch schedule."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def activate(v, ACT: tl.constexpr):
    """ACT indexes activation.ACTIVATIONS: silu, gelu (erf), gelu (tanh), relu; float32 in and out."""
    if ACT == 0:
        return v * tl.sigmoid(v)
    elif ACT == 1:
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return 0.5 * v * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1
    else:
        return tl.maximum(v, 0.0)


@triton.jit
def tile_rows(pid_m, tile_start_ptr, row_start_ptr, counts_ptr, NUM_LEAVES, BLOCK_M: tl.constexpr, LEAVES_P2: tl.constexpr):
    """(leaf, first sorted row, rows' end, valid) of the row tile ``pid_m``: tiles are numbered leaf after leaf."""
    leaves = tl.arange(0, LEAVES_P2)
    starts = tl.load(tile_start_ptr + leaves, mask=leaves < NUM_LEAVES, other=2**30)
    leaf = tl.sum((starts <= pid_m).to(tl.int32), axis=0) - 1
    total = tl.load(tile_start_ptr + NUM_LEAVES)
    first = tl.load(row_start_ptr + leaf) + (pid_m - tl.load(tile_start_ptr + leaf)) * BLOCK_M
    end = tl.load(row_start_ptr + leaf) + tl.load(counts_ptr + leaf)
    return leaf, first, end, pid_m < total


def schedule(pair_leaf: torch.Tensor, num_leaves: int, block_m: int):
    """Rows sorted by leaf (a stable counting sort) and the tile tables the kernels read; no host sync.

    Returns (order: sorted position -> pair, tile_start: (leaves + 1) first tile of each leaf then the total,
    row_start: first sorted row of each leaf, counts: rows per leaf)."""
    order = torch.argsort(pair_leaf, stable=True)
    counts = torch.zeros(num_leaves, dtype=torch.int32, device=pair_leaf.device)
    counts.scatter_add_(0, pair_leaf, torch.ones_like(pair_leaf, dtype=torch.int32))
    tiles = (counts + block_m - 1) // block_m
    tile_start = torch.zeros(num_leaves + 1, dtype=torch.int32, device=pair_leaf.device)
    tile_start[1:] = torch.cumsum(tiles, 0)
    row_start = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return order, tile_start, row_start, counts
