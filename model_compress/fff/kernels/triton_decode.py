"""The one-token tree forward (decoding): each token walks the tree inside the kernels and reads one leaf's slice.

Four launches whatever the depth: the router logits (one cuBLAS GEMV), then ``up`` and ``down``, which
each descend the tree from those logits in registers (``depth`` loads) and multiply with the token's leaf,
stored contiguously, and the shared neurons: a GEMV over leaf_width + shared_width rows instead of the
block's full width. ``down`` is split over those rows into float32 atomics (a token reads too few rows
for one program per output block to fill the GPU); the last launch casts the sum back. For one leaf per token and a few tokens; more go through the grouped kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import activate, leaf_of

MAX_TOKENS = 8  # beyond this the grouped kernels read each leaf once for all its tokens


@triton.jit
def _decode_up_kernel(
    x_ptr, logits_ptr, in_ptr, gate_ptr, in_bias_ptr, shared_in_ptr, shared_gate_ptr, shared_bias_ptr, h_ptr,
    HIDDEN, WIDTH, SHARED,
    DEPTH: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token, pid_n = tl.program_id(0), tl.program_id(1)
    leaf_blocks = tl.cdiv(WIDTH, BLOCK_N)
    if pid_n < leaf_blocks:
        leaf = leaf_of(logits_ptr, token, token >= 0, DEPTH).to(tl.int64)
        neurons = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        count = WIDTH
        column = neurons
        w_in = in_ptr + leaf * WIDTH * HIDDEN
        w_gate = gate_ptr + leaf * WIDTH * HIDDEN
        bias = in_bias_ptr + leaf * WIDTH
    else:
        neurons = (pid_n - leaf_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        count = SHARED
        column = WIDTH + neurons
        w_in = shared_in_ptr
        w_gate = shared_gate_ptr
        bias = shared_bias_ptr
    neuron_ok = neurons < count
    ks = tl.arange(0, BLOCK_K)
    up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k = k0 + ks
        k_ok = k < HIDDEN
        xs = tl.load(x_ptr + token * HIDDEN + k, mask=k_ok, other=0.0).to(tl.float32)
        offsets = neurons[:, None] * HIDDEN + k[None, :]
        mask = neuron_ok[:, None] & k_ok[None, :]
        up += tl.sum(tl.load(w_in + offsets, mask=mask, other=0.0).to(tl.float32) * xs[None, :], axis=1)
        if GATED:
            gate += tl.sum(tl.load(w_gate + offsets, mask=mask, other=0.0).to(tl.float32) * xs[None, :], axis=1)
    if HAS_BIAS:
        up += tl.load(bias + neurons, mask=neuron_ok, other=0.0).to(tl.float32)
    if GATED:
        hidden = activate(gate, ACT) * up
    else:
        hidden = activate(up, ACT)
    tl.store(h_ptr + token * (WIDTH + SHARED) + column, hidden.to(h_ptr.dtype.element_ty), mask=neuron_ok)


@triton.jit
def _decode_down_kernel(
    h_ptr, logits_ptr, out_w_ptr, shared_out_ptr, out_ptr,
    HIDDEN, WIDTH, SHARED,
    DEPTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split over neurons: each program adds BLOCK_K rows' share of BLOCK_N outputs into the float32 ``out``
    (atomics), so the few rows a token reads are spread over the whole GPU."""
    token, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    leaf_chunks = tl.cdiv(WIDTH, BLOCK_K)
    columns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    column_ok = columns < HIDDEN
    if pid_k < leaf_chunks:
        leaf = leaf_of(logits_ptr, token, token >= 0, DEPTH).to(tl.int64)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < WIDTH
        weights = out_w_ptr + leaf * WIDTH * HIDDEN
        h_column = k
    else:
        k = (pid_k - leaf_chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < SHARED
        weights = shared_out_ptr
        h_column = WIDTH + k
    hs = tl.load(h_ptr + token * (WIDTH + SHARED) + h_column, mask=k_ok, other=0.0).to(tl.float32)
    ws = tl.load(weights + k[:, None] * HIDDEN + columns[None, :], mask=k_ok[:, None] & column_ok[None, :], other=0.0)
    tl.atomic_add(out_ptr + token * HIDDEN + columns, tl.sum(ws.to(tl.float32) * hs[:, None], axis=0), mask=column_ok)


def decode_forward(tree, x: torch.Tensor, act: int) -> torch.Tensor:
    """(tokens, hidden) through one leaf per token, for a few tokens: three launches, no sort."""
    tokens, hidden, width, shared = x.shape[0], tree.hidden, tree.leaf_width, tree.shared_width
    logits = tree.router_logits(x).contiguous()
    h = torch.empty(tokens, width + shared, device=x.device, dtype=x.dtype)
    if tree.out_bias is not None:  # the float32 sum the down kernel's programs add into starts at the bias
        out = tree.out_bias.float().expand(tokens, hidden).contiguous()
    else:
        out = torch.zeros(tokens, hidden, device=x.device, dtype=torch.float32)
    gated, has_bias = tree.leaf_gate is not None, tree.leaf_in_bias is not None
    dummy = tree.leaf_in
    up_block = 8
    _decode_up_kernel[(tokens, triton.cdiv(width, up_block) + triton.cdiv(shared, up_block))](
        x, logits, tree.leaf_in, tree.leaf_gate if gated else dummy, tree.leaf_in_bias if has_bias else dummy,
        tree.shared_in if shared else dummy, tree.shared_gate if shared and gated else dummy,
        tree.shared_in_bias if shared and has_bias else dummy, h,
        hidden, width, shared,
        DEPTH=tree.depth, GATED=gated, HAS_BIAS=has_bias, ACT=act, BLOCK_N=up_block, BLOCK_K=256, num_warps=4,
    )
    down_columns, down_rows = 256, 32
    chunks = triton.cdiv(width, down_rows) + triton.cdiv(shared, down_rows)
    _decode_down_kernel[(tokens, triton.cdiv(hidden, down_columns), chunks)](
        h, logits, tree.leaf_out, tree.shared_out if shared else dummy, out, hidden, width, shared,
        DEPTH=tree.depth, BLOCK_N=down_columns, BLOCK_K=down_rows, num_warps=4,
    )
    return out.to(x.dtype)
