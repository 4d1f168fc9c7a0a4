"""The grouped tree forward: rows sorted by leaf, each row tile multiplied by its own leaf's weights.

Two kernels over a static grid (enough row tiles for any split of the rows among the leaves; the spare
ones exit at once), so nothing waits on the host and the call can be captured in a CUDA graph:

1. ``up``: h = act(gate x) * (in x) (gated) or act(in x + b) for the leaf's neurons, one row per
   (token, leaf) pair, in sorted order;
2. ``down``: h @ leaf_out, plus the row's ``addend`` (the shared part and the output bias, computed for
   all tokens at once by cuBLAS: those neurons are dense), stored straight back at the row's place.

With several leaves per token the pairs' outputs are summed per token and the addend added after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import activate, tile_rows
from .triton_schedule import sort_rows


@triton.jit
def _up_kernel(
    x_ptr, token_ptr, in_ptr, gate_ptr, in_bias_ptr, h_ptr,
    counts_ptr,
    HIDDEN, WIDTH, H_STRIDE, NUM_LEAVES,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LEAVES_P2: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    leaf, first, end, valid = tile_rows(pid_m, counts_ptr, NUM_LEAVES, BLOCK_M, LEAVES_P2)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    neurons = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    neuron_ok = neurons < WIDTH
    leaf_offset = leaf.to(tl.int64) * WIDTH * HIDDEN
    ks = tl.arange(0, BLOCK_K)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(valid, HIDDEN, 0), BLOCK_K):  # a spare tile: no rows, no loop
        k = k0 + ks
        k_ok = k < HIDDEN
        xs = tl.load(x_ptr + tokens[:, None] * HIDDEN + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_offsets = leaf_offset + neurons[None, :] * HIDDEN + k[:, None]
        w_mask = neuron_ok[None, :] & k_ok[:, None]
        up = tl.dot(xs, tl.load(in_ptr + w_offsets, mask=w_mask, other=0.0), up)
        if GATED:
            gate = tl.dot(xs, tl.load(gate_ptr + w_offsets, mask=w_mask, other=0.0), gate)
    if HAS_BIAS:
        up += tl.load(in_bias_ptr + leaf * WIDTH + neurons, mask=neuron_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        hidden = activate(gate, ACT) * up
    else:
        hidden = activate(up, ACT)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * H_STRIDE + neurons[None, :], hidden.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & neuron_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, pair_ptr, out_w_ptr, addend_ptr, out_ptr,
    counts_ptr,
    HIDDEN, WIDTH, H_STRIDE, NUM_LEAVES,
    HAS_ADDEND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LEAVES_P2: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    leaf, first, end, valid = tile_rows(pid_m, counts_ptr, NUM_LEAVES, BLOCK_M, LEAVES_P2)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    columns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    column_ok = columns < HIDDEN
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * H_STRIDE
    w_leaf = out_w_ptr + leaf.to(tl.int64) * WIDTH * HIDDEN
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(valid, WIDTH, 0), BLOCK_K):
        k = k0 + ks
        k_ok = k < WIDTH
        hs = tl.load(h_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        ws = tl.load(w_leaf + k[:, None] * HIDDEN + columns[None, :], mask=k_ok[:, None] & column_ok[None, :], other=0.0)
        acc = tl.dot(hs, ws, acc)
    pairs = tl.load(pair_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    places = pairs[:, None] * HIDDEN + columns[None, :]
    mask = row_ok[:, None] & column_ok[None, :]
    if HAS_ADDEND:
        acc += tl.load(addend_ptr + places, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + places, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(rows: int, leaves: int) -> dict:
    """Tile sizes from the rows a leaf gets: small tiles for a few rows, Hopper-sized ones for prefill."""
    per_leaf = rows / leaves
    if per_leaf <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    if per_leaf <= 64:
        return {"BLOCK_M": 32 if per_leaf <= 32 else 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def grouped_forward(tree, x: torch.Tensor, act: int) -> torch.Tensor:
    """(tokens, hidden) through ``tree``'s leaves for each token (its route, or its top leaves), shared part and
    bias included."""
    tokens, k = x.shape[0], tree.leaves_per_token
    hidden, width, num_leaves = tree.hidden, tree.leaf_width, tree.num_leaves
    order, token_of_row, counts = sort_rows(tree, x)
    addend = tree.out_bias.expand(tokens, hidden) if tree.out_bias is not None else None
    if tree.shared_width:  # dense neurons: cuBLAS
        shared = tree.shared_activations(x)
        addend = torch.addmm(tree.out_bias, shared, tree.shared_out) if addend is not None else shared @ tree.shared_out
    rows = tokens * k
    tiles = _tiles(rows, num_leaves)
    block_m = tiles["BLOCK_M"]
    # h's rows padded to 16 elements: a leaf width such as 877 would misalign every row after the first, and
    # Triton vectorizes the loads and stores of a row only when it knows the stride is a multiple of 16
    h_stride = triton.cdiv(width, 16) * 16
    h = torch.empty(rows, h_stride, device=x.device, dtype=x.dtype)
    out = torch.empty(rows, hidden, device=x.device, dtype=x.dtype)
    max_tiles = triton.cdiv(rows, block_m) + num_leaves
    leaves_p2 = triton.next_power_of_2(num_leaves)
    gated, has_bias = tree.leaf_gate is not None, tree.leaf_in_bias is not None
    dummy = tree.leaf_in
    up_tiles = dict(tiles, BLOCK_N=min(tiles["BLOCK_N"], 64) if gated else tiles["BLOCK_N"])  # two accumulators
    _up_kernel[(max_tiles, triton.cdiv(width, up_tiles["BLOCK_N"]))](
        x, token_of_row, tree.leaf_in, tree.leaf_gate if gated else dummy, tree.leaf_in_bias if has_bias else dummy, h,
        counts, hidden, width, h_stride, num_leaves,
        GATED=gated, HAS_BIAS=has_bias, ACT=act, LEAVES_P2=leaves_p2, **up_tiles,
    )
    fuse_addend = k == 1 and addend is not None
    addend_in = addend.contiguous() if fuse_addend else dummy
    _down_kernel[(max_tiles, triton.cdiv(hidden, tiles["BLOCK_N"]))](
        h, order, tree.leaf_out, addend_in, out, counts, hidden, width, h_stride, num_leaves,
        HAS_ADDEND=fuse_addend, LEAVES_P2=leaves_p2, **tiles,
    )
    if k == 1:
        return out
    out = out.view(tokens, k, hidden).sum(1)
    return out + addend if addend is not None else out
