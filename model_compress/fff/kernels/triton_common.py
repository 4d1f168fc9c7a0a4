"""What the tree kernels share: the activations, a token's leaf, the leaf a row tile belongs to."""

from __future__ import annotations

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
def leaf_of(logits_ptr, token, mask, DEPTH: tl.constexpr):
    """The leaf of ``token`` (a scalar or a vector): from the root, right where the router's logit is positive
    (ties go left, as ``FastFeedForward.route``); ``logits_ptr`` holds (tokens, nodes) logits."""
    nodes = (1 << DEPTH) - 1
    row = token.to(tl.int64) * nodes
    node = token * 0
    for _ in tl.static_range(DEPTH):
        logit = tl.load(logits_ptr + row + node, mask=mask, other=0.0).to(tl.float32)
        node = 2 * node + 1 + (logit > 0).to(tl.int32)
    return node - nodes


@triton.jit
def tile_rows(pid_m, counts_ptr, NUM_LEAVES, BLOCK_M: tl.constexpr, LEAVES_P2: tl.constexpr):
    """(leaf, first sorted row, rows' end, valid) of the row tile ``pid_m``, from the rows per leaf alone.

    Tiles are numbered leaf after leaf (a leaf of n rows has ceil(n / BLOCK_M) of them), rows are sorted by
    leaf. A spare tile (``valid`` false: the grid is sized for any split of the rows) gets leaf 0 and ``end``
    0, so ``rows < end`` masks all its rows."""
    leaves = tl.arange(0, LEAVES_P2)
    counts = tl.load(counts_ptr + leaves, mask=leaves < NUM_LEAVES, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    row_end = tl.cumsum(counts, 0)
    leaf = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    valid = pid_m < tl.sum(tiles, axis=0)
    mine = leaves == leaf
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, row_end - counts, 0), axis=0)
    end = tl.where(valid, tl.sum(tl.where(mine, row_end, 0), axis=0), 0)
    return tl.where(valid, leaf, 0), row_start + (pid_m - first_tile) * BLOCK_M, end, valid
