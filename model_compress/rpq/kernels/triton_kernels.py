"""Triton kernels for the RPQ forward on CUDA: the weight is decoded tile by tile in registers, never whole.

Linear (``W[h*D + d, c] = codebooks[h, indices[h, c], d]``). One token (decoding): the binned kernel,
from the codes grouped by value (``layout.code_bins``): x summed over each group, times the group's
codebook row. A few tokens: the gather kernel, where a program owns a (tokens x outputs) tile of
``y``; for each slice of inputs it reads the slice's codes, gathers the matching codebook rows (a
few KB per codebook, so they come from L1/L2, not memory), and multiplies them with ``x``: with
tensor cores (``tl.dot``) from 16 tokens on, as a broadcast multiply-sum below. Memory traffic is
the codes plus each codebook once, about an eighth of the dense weight at the default M=32, K=256.
``linear_decode`` is the other large-batch path: decode ``W^T`` into a temporary with one kernel,
then cuBLAS.

Embedding: one gather kernel for the rows asked for. Tied LM head: ``x_h @ codebooks[h]^T`` scores
the K codes of every codebook (a small kernel), then a kernel sums, for each vocabulary row, the
scores of its M codes: the table is never decoded.

Everything here is launch-only: no host syncs, no host-visible allocation besides the outputs (and
the split-K arrival counters, kept per device), so a model using these kernels can be
captured in a CUDA graph. Temporaries (split-K partials, the decode paths' W^T or table chunk)
come from PyTorch's caching allocator and go back to it after the call: a buffer kept for the
largest call would sit in every later decode step's memory. Which path and which tile sizes a call takes is decided in
``triton_dispatch``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..fusions.norm_spec import NormSpec
from .routes import BINNED, TileConfig, heads_per_tile


@triton.jit
def _rpq_linear_kernel(
    x_ptr,
    codes_ptr,
    codebooks_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    tokens,
    in_features,
    out_features,
    stride_x,
    stride_out,
    split_k,
    chunk_k,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HEADS: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    LINE: tl.constexpr,
    CODE_LINES: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < tokens
    mask_n = offs_n < out_features
    if HEADS == 1:
        # The tile lies inside one codebook h: one code per input column, contiguous codebook rows.
        first = pid_n * BLOCK_N
        head = first // PIECE
        code_row = codes_ptr + head * in_features
        slice_base = codebooks_ptr + head * CODEBOOK_SIZE * PIECE + (first - head * PIECE)
        row_base = slice_base + tl.arange(0, BLOCK_N)
    elif HEADS == 2:
        # The tile is two whole codebooks side by side (BLOCK_N = 2 * PIECE): each has its own codes,
        # gather and accumulator (one tensor-core product each, on the same x tile); joined at the end.
        head = pid_n * 2
        code_row = codes_ptr + head * in_features
        second_in = pid_n * BLOCK_N + PIECE < out_features  # the last tile may hold one codebook only
        row_base = codebooks_ptr + head * CODEBOOK_SIZE * PIECE + tl.arange(0, PIECE)
        acc2 = tl.zeros((BLOCK_M, PIECE), dtype=tl.float32)
    else:
        # Outputs of several codebooks (short pieces): one code per (input, output) pair.
        heads = offs_n // PIECE
        pieces = offs_n - heads * PIECE
    acc = tl.zeros((BLOCK_M, BLOCK_N if HEADS != 2 else PIECE), dtype=tl.float32)
    k_begin = pid_k * chunk_k
    k_end = tl.minimum(k_begin + chunk_k, in_features)
    if PDL:
        gdc_launch_dependents()  # the next layer's programs may start their own weight prefetch
    if PREFETCH and HEADS == 1:
        # Weights do not depend on the previous kernel: ask L2 for this program's codes and whole codebook
        # slice now, so the gathers below (which wait for the codes) find their rows on chip.
        code_lines = k_begin + tl.arange(0, CODE_LINES) * 128
        _prefetch_l2(code_row + code_lines, code_lines < k_end)
        _prefetch_codebook_slice(slice_base, CODEBOOK_SIZE, PIECE, BLOCK_N, LINE)
    if PDL:
        gdc_wait()  # x is the previous kernel's output: wait for it only now
    # Codes are loaded one step ahead: the gather of step i then needs no load of step i, so the
    # pipeliner issues it early instead of stalling every step on a global load (1-byte codes cannot
    # go through cp.async, so their load is a plain one, waited for at first use).
    first_k = k_begin + tl.arange(0, BLOCK_K)
    if HEADS >= 1:
        next_codes = tl.load(code_row + first_k, mask=first_k < k_end, other=0)
    if HEADS == 2:
        next_codes2 = tl.load(code_row + in_features + first_k, mask=(first_k < k_end) & second_in, other=0)
    for start in range(k_begin, k_end, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_features
        x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HEADS >= 1:
            codes = next_codes.to(tl.int32)
            ahead = offs_k + BLOCK_K
            next_codes = tl.load(code_row + ahead, mask=ahead < k_end, other=0)
            if EVEN_K:
                w = tl.load(row_base[None, :] + codes[:, None] * PIECE)
            else:
                w = tl.load(row_base[None, :] + codes[:, None] * PIECE, mask=mask_k[:, None], other=0.0)
            if HEADS == 2:  # the second codebook: its rows lie one codebook further on
                codes2 = next_codes2.to(tl.int32)
                next_codes2 = tl.load(code_row + in_features + ahead, mask=(ahead < k_end) & second_in, other=0)
                if EVEN_K:
                    w2 = tl.load(row_base[None, :] + (CODEBOOK_SIZE + codes2[:, None]) * PIECE, mask=second_in, other=0.0)
                else:
                    w2 = tl.load(row_base[None, :] + (CODEBOOK_SIZE + codes2[:, None]) * PIECE, mask=mask_k[:, None] & second_in,
                                 other=0.0)
                acc2 = _accumulate(acc2, x, w2, USE_DOT, DOT_IEEE)
        else:
            mask_kn = mask_k[:, None] & mask_n[None, :]
            codes = tl.load(codes_ptr + heads[None, :] * in_features + offs_k[:, None], mask=mask_kn, other=0).to(tl.int32)
            w = tl.load(
                codebooks_ptr + (heads[None, :] * CODEBOOK_SIZE + codes) * PIECE + pieces[None, :], mask=mask_kn, other=0.0
            )
        acc = _accumulate(acc, x, w, USE_DOT, DOT_IEEE)
    if HEADS == 2:
        acc = tl.reshape(tl.permute(tl.join(acc, acc2), (0, 2, 1)), (BLOCK_M, BLOCK_N))
    _store_tile(acc, partial_ptr, counter_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, tokens, out_features,
                stride_out, split_k, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _accumulate(acc, x, w, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr):
    """acc + x @ w: tensor cores from 16 rows on (IEEE float32 for float32 weights), else a broadcast multiply-sum."""
    if USE_DOT and DOT_IEEE:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    elif USE_DOT:
        acc = tl.dot(x, w, acc)
    else:
        acc += tl.sum(x[:, :, None].to(tl.float32) * w[None, :, :].to(tl.float32), axis=1)
    return acc


@triton.jit
def _rpq_binned_kernel(
    x_ptr,
    slots_ptr,
    row_codes_ptr,
    codebooks_ptr,
    bias_ptr,
    out_ptr,
    tokens,
    rows,
    stride_x,
    stride_out,
    slots1_ptr,
    row_codes1_ptr,
    codebooks1_ptr,
    bias1_ptr,
    rows1,
    slots2_ptr,
    row_codes2_ptr,
    codebooks2_ptr,
    bias2_ptr,
    rows2,
    gamma_ptr,
    eps,
    in_features,
    up_ptr,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    NUM_CODEBOOKS: tl.constexpr,
    MEMBERS: tl.constexpr,
    NORM: tl.constexpr,
    GATED: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr,
    SLOT_LINES: tl.constexpr,
    LINE: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    LOCAL_X: tl.constexpr,
    IN_BLOCK: tl.constexpr,
):
    """Few tokens: piece h of y is sum over rows r of (x summed over row r's inputs) * codebooks[h, code of r].

    ``layout.code_bins`` groups each codebook's inputs by code into rows of WIDTH slots, so the
    kernel gathers x once per input and one codebook row per row: D times less work than gathering
    a codebook row per input, and every codebook row read once. A program owns its outputs: no
    split-K hand-over. Programs of one codebook (one per BLOCK_N outputs) each redo the row sums,
    which are cheap. With PRELOAD (one row block covers all rows) the weights are loaded before the
    PDL wait for x: the chain slots/row codes -> codebook rows then overlaps the previous kernel.

    MEMBERS (up to 3) layers of one shape that read the same x (q/k/v) run as one launch, member m
    with its own ``*<m>_ptr`` tensors and row count, its outputs in columns m*out.. of ``out``.

    NORM (1 LayerNorm, 2 RMSNorm): x is the norm's input, not its output (``fused_norm``). Each
    program takes x's statistics itself (a few KB from L2) and gathers the norm weight beside x, so
    a row's sum becomes rstd * (sum of gamma*x - mean * sum of gamma); the norm's bias is already in
    ``bias`` (W beta, added at load). The gamma gather needs only the slots: it is a weight load.

    GATED: the layer's input is silu(x) * up (a SiLU-gated MLP's down projection, ``fused_glu``):
    ``up`` is gathered at the same slots, with x's row stride, and the product never exists.
    """
    tiles: tl.constexpr = (PIECE + BLOCK_N - 1) // BLOCK_N
    member_programs: tl.constexpr = NUM_CODEBOOKS * tiles
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    member = pid_n // member_programs
    local = pid_n - member * member_programs
    if MEMBERS > 1:
        first, second = member == 1, member == 2
        slots_ptr = tl.where(first, slots1_ptr, tl.where(second, slots2_ptr, slots_ptr))
        row_codes_ptr = tl.where(first, row_codes1_ptr, tl.where(second, row_codes2_ptr, row_codes_ptr))
        codebooks_ptr = tl.where(first, codebooks1_ptr, tl.where(second, codebooks2_ptr, codebooks_ptr))
        bias_ptr = tl.where(first, bias1_ptr, tl.where(second, bias2_ptr, bias_ptr))
        rows = tl.where(first, rows1, tl.where(second, rows2, rows))
    head = local // tiles
    offs_d = (local - head * tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = offs_d < PIECE
    slot_base = slots_ptr + head * rows * WIDTH
    code_base = row_codes_ptr + head * rows
    slice_base = codebooks_ptr + head * CODEBOOK_SIZE * PIECE + (local - head * tiles) * BLOCK_N
    if PDL:
        gdc_launch_dependents()
    if PREFETCH:
        # Weights only: ask L2 for this program's slots, row codes and codebook slice while x may not exist yet.
        slot_lines = tl.arange(0, SLOT_LINES) * 64  # 128-byte lines of int16 slots
        _prefetch_l2(slot_base + slot_lines, slot_lines < rows * WIDTH)
        code_lines = tl.arange(0, SLOT_LINES) * 64
        _prefetch_l2(code_base + code_lines, code_lines < rows)
        _prefetch_codebook_slice(slice_base, CODEBOOK_SIZE, PIECE, BLOCK_N, LINE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PRELOAD:
        # One row block holds every row: load the weights into registers before waiting for x, so that
        # under PDL they arrive while the previous kernel still runs; after the wait only x is gathered.
        slots, codebook_rows = _load_bin_rows(slot_base, code_base, slice_base, 0, rows, mask_d, WIDTH, PIECE, BLOCK_N, ROW_BLOCK)
        gammas = _load_gammas(gamma_ptr, slots, NORM)
        if PDL:
            gdc_wait()
        means, rstds = _norm_stats(x_ptr, pid_m, tokens, stride_x, in_features, eps, NORM, BLOCK_M, NORM_BLOCK)
        acc = _add_bin_rows(acc, x_ptr, up_ptr, slots, codebook_rows, gammas, means, rstds, pid_m, tokens, stride_x, in_features,
                            NORM, GATED, BLOCK_M, LOCAL_X, IN_BLOCK)
    else:
        if PDL:
            gdc_wait()  # x is the previous kernel's output
        means, rstds = _norm_stats(x_ptr, pid_m, tokens, stride_x, in_features, eps, NORM, BLOCK_M, NORM_BLOCK)
        for first in range(0, rows, ROW_BLOCK):
            slots, codebook_rows = _load_bin_rows(slot_base, code_base, slice_base, first, rows, mask_d, WIDTH, PIECE, BLOCK_N, ROW_BLOCK)
            gammas = _load_gammas(gamma_ptr, slots, NORM)
            acc = _add_bin_rows(acc, x_ptr, up_ptr, slots, codebook_rows, gammas, means, rstds, pid_m, tokens, stride_x,
                                in_features, NORM, GATED, BLOCK_M, LOCAL_X, IN_BLOCK)
    token_rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + token_rows
    offs_n = head * PIECE + offs_d
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < tokens)[:, None] & mask_d[None, :]
    columns = out_ptr + member * (NUM_CODEBOOKS * PIECE) + offs_n
    tl.store(columns[None, :] + offs_m[:, None] * stride_out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_bin_rows(slot_base, code_base, slice_base, first, rows, mask_d, WIDTH: tl.constexpr, PIECE: tl.constexpr,
                   BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Rows first..first+ROW_BLOCK of one codebook's bins: their slots (-1 past the last row) and codebook rows."""
    offs_r = first + tl.arange(0, ROW_BLOCK)
    mask_r = offs_r < rows
    codes = tl.load(code_base + offs_r, mask=mask_r, other=0).to(tl.int32)
    slots = tl.load(slot_base + offs_r[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :], mask=mask_r[:, None], other=-1).to(tl.int32)
    codebook_rows = tl.load(slice_base + codes[:, None] * PIECE + tl.arange(0, BLOCK_N)[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    return slots, codebook_rows


@triton.jit
def _load_gammas(gamma_ptr, slots, NORM: tl.constexpr):
    """The norm weight at each slot's input (0 in empty slots); without a norm, a placeholder never read."""
    if NORM:
        gammas = tl.load(gamma_ptr + slots, mask=slots >= 0, other=0.0).to(tl.float32)
    else:
        gammas = slots.to(tl.float32)
    return gammas


@triton.jit
def _norm_stats(x_ptr, pid_m, tokens, stride_x, in_features, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                NORM_BLOCK: tl.constexpr):
    """Per token of this program: the mean (0 for RMSNorm) and 1/sqrt(var + eps) of x, in float32, two passes."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = x_ptr + offs_m[:, None] * stride_x
    valid = (offs_m < tokens)[:, None]
    means = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstds = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    if NORM:
        if NORM == 1:
            total = tl.zeros((BLOCK_M, NORM_BLOCK), dtype=tl.float32)
            for start in range(0, in_features, NORM_BLOCK):
                offs = start + tl.arange(0, NORM_BLOCK)
                total += tl.load(rows + offs[None, :], mask=valid & (offs < in_features)[None, :], other=0.0).to(tl.float32)
            means = tl.sum(total, axis=1) / in_features
        squares = tl.zeros((BLOCK_M, NORM_BLOCK), dtype=tl.float32)
        for start in range(0, in_features, NORM_BLOCK):
            offs = start + tl.arange(0, NORM_BLOCK)
            inside = valid & (offs < in_features)[None, :]
            centred = tl.load(rows + offs[None, :], mask=inside, other=0.0).to(tl.float32) - means[:, None]
            centred = tl.where(inside, centred, 0.0)
            squares += centred * centred
        rstds = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / in_features + eps)
    return means, rstds


@triton.jit
def _add_bin_rows(acc, x_ptr, up_ptr, slots, codebook_rows, gammas, means, rstds, pid_m, tokens, stride_x, in_features,
                  NORM: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, LOCAL_X: tl.constexpr, IN_BLOCK: tl.constexpr):
    """acc[t] += sum over the rows of (x[t] summed over the row's slots) * the row's codebook row, per token t.

    With NORM the row sum is of the normalised x: rstd * (sum gamma*x - mean * sum gamma). With
    GATED it is of silu(x) * up. LOCAL_X: x's row (and up's) is loaded whole, with one coalesced
    load, and gathered on chip (``tl.gather``) instead of by one global load per slot.
    """
    used = slots >= 0
    token_rows = tl.arange(0, BLOCK_M)
    for row in tl.static_range(BLOCK_M):
        token = pid_m * BLOCK_M + row
        picked = _gather_row(x_ptr + token * stride_x, slots, used, in_features, token < tokens, LOCAL_X, IN_BLOCK)
        if GATED:
            up = _gather_row(up_ptr + token * stride_x, slots, used, in_features, token < tokens, LOCAL_X, IN_BLOCK)
            picked = picked * tl.sigmoid(picked) * up
        if NORM:
            mean = tl.sum(tl.where(token_rows == row, means, 0.0), axis=0)
            rstd = tl.sum(tl.where(token_rows == row, rstds, 0.0), axis=0)
            sums = rstd * (tl.sum(picked * gammas, axis=1) - mean * tl.sum(gammas, axis=1))
        else:
            sums = tl.sum(picked, axis=1)  # (ROW_BLOCK,)
        part = tl.sum(sums[:, None] * codebook_rows.to(tl.float32), axis=0)  # (BLOCK_N,)
        acc += tl.where(token_rows[:, None] == row, part[None, :], 0.0)
    return acc


@triton.jit
def _gather_row(row_ptr, slots, used, in_features, valid, LOCAL_X: tl.constexpr, IN_BLOCK: tl.constexpr):
    """row[slots] in float32 (0 in empty slots): one global load per slot, or (LOCAL_X) the row loaded whole and
    gathered on chip."""
    if LOCAL_X:
        offs = tl.arange(0, IN_BLOCK)
        whole = tl.load(row_ptr + offs, mask=(offs < in_features) & valid, other=0.0).to(tl.float32)
        flat = tl.reshape(tl.where(used, slots, 0), (slots.shape[0] * slots.shape[1],))
        picked = tl.where(used, tl.reshape(tl.gather(whole, flat, 0), slots.shape), 0.0)
    else:
        picked = tl.load(row_ptr + slots, mask=used & valid, other=0.0).to(tl.float32)
    return picked


@triton.jit
def _prefetch_codebook_slice(slice_base, CODEBOOK_SIZE: tl.constexpr, PIECE: tl.constexpr, BLOCK_N: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetch of BLOCK_N columns of every row of one codebook (LINE elements per 128-byte line)."""
    lines = tl.arange(0, CODEBOOK_SIZE)[:, None] * PIECE + tl.arange(0, (BLOCK_N + LINE - 1) // LINE)[None, :] * LINE
    _prefetch_l2(slice_base + lines, lines >= 0)


@triton.jit
def _prefetch_l2(pointers, mask):
    """``prefetch.global.L2`` of the cache lines at ``pointers`` (where ``mask``): no registers, no wait."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r",
        [pointers, mask.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _store_tile(acc, partial_ptr, counter_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, tokens, out_features,
                stride_out, split_k, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a finished tile, or (split-K) leave a partial sum and let the tile's last program add them up.

    The last program is found with an atomic counter that also orders the partial writes; it puts
    the counter back to 0, so the counters need no reset between calls (or graph replays).
    """
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tile_offs = offs_m[:, None] * out_features + offs_n[None, :]
        tl.store(partial_ptr + tl.program_id(2) * tokens * out_features + tile_offs, acc, mask=mask_mn)
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == split_k - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for part in range(0, split_k):
                acc += tl.load(partial_ptr + part * tokens * out_features + tile_offs, mask=mask_mn, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + tile, 0)
            _finish_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_n, mask_mn, stride_out, HAS_BIAS)
    else:
        _finish_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_n, mask_mn, stride_out, HAS_BIAS)


@triton.jit
def _finish_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_n, mask_mn, stride_out, HAS_BIAS: tl.constexpr):
    """Add the bias and store the tile in the output dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _rpq_rows_kernel(
    ids_ptr,
    codes_ptr,
    codebooks_ptr,
    out_ptr,
    first_row,
    rows,
    columns,
    dim,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[t, h*D + d] = codebooks[h, indices[h, r], d] for row r = ids[t] (or first_row + t without ids).

    Rows of an embedding table, and equally rows of a Linear's W^T (in, out): both keep their codes
    in an (M, columns) array, piece h of row r being code indices[h, r] of codebook h.
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_t < rows)[:, None] & (offs_n < dim)[None, :]
    if HAS_IDS:
        picked = tl.load(ids_ptr + offs_t, mask=offs_t < rows, other=0).to(tl.int64)
    else:
        picked = (first_row + offs_t).to(tl.int64)
    heads = offs_n // PIECE
    pieces = offs_n - heads * PIECE
    codes = tl.load(codes_ptr + heads[None, :].to(tl.int64) * columns + picked[:, None], mask=mask, other=0).to(tl.int32)
    w = tl.load(codebooks_ptr + (heads[None, :] * CODEBOOK_SIZE + codes) * PIECE + pieces[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs_t[:, None] * dim + offs_n[None, :], w, mask=mask)


@triton.jit
def _rpq_code_scores_kernel(
    x_ptr,
    codebooks_ptr,
    scores_ptr,
    tokens,
    stride_x,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """scores[h, t, k] = x[t, piece h] . codebooks[h, k] in float32, one program per (codebook, token).

    Few tokens only (the tied head's score path): a kernel of ours instead of a cuBLAS bmm keeps a
    decode step free of cuBLAS, whose workspace (32 MiB per stream) would otherwise be allocated
    for every stream the step runs on.
    """
    head = tl.program_id(0)
    token = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < PIECE
    x = tl.load(x_ptr + token * stride_x + head * PIECE + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    out = scores_ptr + (head * tokens + token) * CODEBOOK_SIZE
    for first in range(0, CODEBOOK_SIZE, BLOCK_K):
        offs_k = first + tl.arange(0, BLOCK_K)
        mask_k = offs_k < CODEBOOK_SIZE
        rows = tl.load(codebooks_ptr + (head * CODEBOOK_SIZE + offs_k[:, None]) * PIECE + offs_d[None, :],
                       mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        tl.store(out + offs_k, tl.sum(rows.to(tl.float32) * x[None, :], axis=1), mask=mask_k)


@triton.jit
def _rpq_tied_head_kernel(
    scores_ptr,
    codes_ptr,
    bias_ptr,
    out_ptr,
    tokens,
    vocab,
    NUM_CODEBOOKS: tl.constexpr,
    CODEBOOK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """logits[t, v] = sum_h scores[h, t, indices[h, v]]: the M codes of row v, scored once per token."""
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_t = offs_t < tokens
    mask_v = offs_v < vocab
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for head in range(NUM_CODEBOOKS):
        codes = tl.load(codes_ptr + head * vocab + offs_v, mask=mask_v, other=0).to(tl.int32)
        row = scores_ptr + (head * tokens + offs_t[:, None]) * CODEBOOK_SIZE
        acc += tl.load(row + codes[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[:, None] * vocab + offs_v[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


def _rows(x: Tensor, width: int) -> Tensor:
    """x as a (tokens, width) matrix with unit stride along the row (a copy only if it has to be)."""
    rows = x.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. ``triton.cdiv`` is a constexpr function in Triton 3.6: about 10 us per host call."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (host side; ``triton.next_power_of_2`` costs as much as ``triton.cdiv``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the CPU interpreter runs no inline PTX


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    """Programmatic dependent launch (``griddepcontrol``) needs compute capability 9.0."""
    return not INTERPRETED and torch.cuda.get_device_capability(device)[0] >= 9


def linear_fused(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None, config: TileConfig) -> Tensor:
    """y = x W^T + b without W: codebook rows gathered into each tile of the matmul."""
    num_codebooks, codebook_size, piece = codebooks.shape
    in_features = indices.shape[1]
    out_features = num_codebooks * piece
    rows = _rows(x.to(codebooks.dtype), in_features)
    tokens = rows.shape[0]
    out = torch.empty(tokens, out_features, device=x.device, dtype=x.dtype)
    if tokens:
        tiles_n, tiles_m = _cdiv(out_features, config.block_n), _cdiv(tokens, config.block_m)
        # Split the inputs only as far as each part keeps at least one BLOCK_K slice.
        split = max(1, min(config.split_k, _cdiv(in_features, config.block_k)))
        chunk = _cdiv(_cdiv(in_features, split), config.block_k) * config.block_k
        split = _cdiv(in_features, chunk)
        if split > 1:
            partial = torch.empty(split * tokens * out_features, device=x.device, dtype=torch.float32)
            counter = tile_counters(tiles_n * tiles_m, x.device)
        else:
            partial = counter = out
        common = (rows, indices, codebooks, bias if bias is not None else codebooks, out, partial, counter,
                  tokens, in_features, out_features, rows.stride(0), out.stride(0), split, chunk)
        sizes = dict(
            CODEBOOK_SIZE=codebook_size,
            PIECE=piece,
            HAS_BIAS=bias is not None,
            EVEN_K=in_features % config.block_k == 0,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            SPLIT=split > 1,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        pdl = config.pdl and _hopper_or_later(x.device)
        _rpq_linear_kernel[(tiles_n, tiles_m, split)](
            *common,
            HEADS=heads_per_tile(piece, config.block_n),
            USE_DOT=config.use_dot,
            DOT_IEEE=codebooks.dtype == torch.float32,  # float32 stays float32 (no TF32), as in the reference
            PREFETCH=config.prefetch and not INTERPRETED,
            LINE=128 // codebooks.element_size(),
            CODE_LINES=_next_power_of_2(_cdiv(chunk, 128)),
            PDL=pdl,
            launch_pdl=pdl,
            **sizes,
        )
    return out.reshape(*x.shape[:-1], out_features)


def binned_fits(config: TileConfig, codebooks: Tensor) -> bool:
    """The binned kernel takes few-token tiles (its token loop is unrolled) and K up to 1024 (its prefetch list)."""
    return config.kind == BINNED and config.block_m <= 16 and codebooks.shape[1] <= 1024


def linear_binned(
    x: Tensor,
    codebooks: Tensor,
    bins: tuple[Tensor, Tensor],
    bias: Tensor | None,
    config: TileConfig,
    norm: NormSpec | None = None,
    up: Tensor | None = None,
) -> Tensor:
    """y = x W^T + b for few tokens from the codes grouped by value (``bins`` = ``layout.code_bins(indices, K)``).

    ``block_k`` is the rows per step; ``split_k`` does not apply (a program owns its outputs). With
    ``norm``, x is the input of that norm (applied in the kernel; its bias must already be in ``bias``).
    With ``up`` (same shape as x), the layer's input is silu(x) * up, formed in the kernel.
    """
    return linear_binned_group(x, [(codebooks, bins, bias)], config, norm, up)[0]


MAX_GROUP = 3  # layers per launch of the binned kernel (q, k, v)


def linear_binned_group(
    x: Tensor,
    members: list[tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]],
    config: TileConfig,
    norm: NormSpec | None = None,
    up: Tensor | None = None,
) -> list[Tensor]:
    """``linear_binned`` of up to MAX_GROUP layers of one shape on the same ``x``, in one launch.

    ``members``: (codebooks, bins, bias) each, all with the same codebook shape, bin width and bias
    presence. Returns each member's output, as views into one (tokens, members * out) tensor.
    ``norm`` and ``up`` as in ``linear_binned`` (not both).
    """
    if norm is not None and up is not None:
        raise ValueError("the binned kernel applies a norm or a gate to its input, not both")
    if up is not None and up.shape != x.shape:
        raise ValueError(f"gate {tuple(x.shape)} and up {tuple(up.shape)} differ in shape")
    codebooks, (slots, row_codes), bias = members[0]
    num_codebooks, codebook_size, piece = codebooks.shape
    width = slots.shape[2]
    row_counts = [bins[0].shape[1] for _, bins, _ in members]
    out_features = num_codebooks * piece
    in_features = x.shape[-1]
    rows_in = _rows(x.to(codebooks.dtype), in_features)
    up_rows = _rows(up.to(codebooks.dtype), in_features) if up is not None else rows_in
    if up_rows.stride(0) != rows_in.stride(0):  # the kernel reads both with one row stride
        rows_in, up_rows = rows_in.contiguous(), up_rows.contiguous()
    tokens = rows_in.shape[0]
    out = torch.empty(tokens, len(members) * out_features, device=x.device, dtype=x.dtype)
    if tokens:
        block_n = min(config.block_n, _next_power_of_2(piece))
        grid = (len(members) * num_codebooks * _cdiv(piece, block_n), _cdiv(tokens, config.block_m))
        pdl = config.pdl and _hopper_or_later(x.device)
        row_block = min(config.block_k, _next_power_of_2(max(row_counts)))
        others = []
        for index in (1, 2):  # members 1 and 2 (member 0's tensors again where there are fewer)
            member_codebooks, (member_slots, member_codes), member_bias = members[min(index, len(members) - 1)]
            others += [member_slots, member_codes, member_codebooks, member_bias if member_bias is not None else member_codebooks,
                       member_slots.shape[1]]
        _rpq_binned_kernel[grid](
            rows_in,
            slots,
            row_codes,
            codebooks,
            bias if bias is not None else codebooks,
            out,
            tokens,
            row_counts[0],
            rows_in.stride(0),
            out.stride(0),
            *others,
            norm.weight if norm is not None else codebooks,
            norm.eps if norm is not None else 0.0,
            in_features,
            up_rows,
            CODEBOOK_SIZE=codebook_size,
            PIECE=piece,
            NUM_CODEBOOKS=num_codebooks,
            MEMBERS=len(members),
            NORM=norm.kind if norm is not None else 0,
            GATED=up is not None,
            NORM_BLOCK=min(1024, _next_power_of_2(in_features)),
            HAS_BIAS=bias is not None,
            WIDTH=width,
            BLOCK_M=config.block_m,
            BLOCK_N=block_n,
            ROW_BLOCK=row_block,
            PREFETCH=config.prefetch and not INTERPRETED and slots.dtype == torch.int16,
            SLOT_LINES=_next_power_of_2(_cdiv(max(row_counts) * max(2 * width, 4), 128)),  # covers slots and row codes
            LINE=128 // codebooks.element_size(),
            PDL=pdl,
            PRELOAD=pdl and max(row_counts) <= row_block,
            LOCAL_X=config.local_x,
            IN_BLOCK=_next_power_of_2(in_features) if config.local_x else 1,
            launch_pdl=pdl,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    grouped = out.view(*x.shape[:-1], len(members) * out_features)
    return [grouped.narrow(-1, index * out_features, out_features) for index in range(len(members))]


_COUNTERS: dict[torch.device, list[Tensor]] = {}  # per device: every counter buffer made, the largest last


def clear_workspaces() -> None:
    """Forget the kept split-K counters (between models measured one after the other)."""
    _COUNTERS.clear()


def kept_bytes() -> int:
    """Device bytes these kernels keep between calls (the split-K counters): what a model's memory has beyond its own."""
    return sum(t.numel() * t.element_size() for kept in _COUNTERS.values() for t in kept)


def tile_counters(count: int, device: torch.device) -> Tensor:
    """Split-K arrival counters, zero at rest: the kernel puts each back to 0 when its tile is done.

    Sized to the largest call so far (a power of two, at least 128: one 512-byte allocator block).
    A smaller buffer made before is kept, not freed: a CUDA graph captured with it still writes there.
    """
    kept = _COUNTERS.setdefault(torch.device(device), [])
    if not kept or kept[-1].numel() < count:
        kept.append(torch.zeros(max(128, _next_power_of_2(count)), device=device, dtype=torch.int32))
    return kept[-1]


def decode_rows(codebooks: Tensor, indices: Tensor, out: Tensor, ids: Tensor | None = None, first_row: int = 0) -> Tensor:
    """Decode rows ``ids`` (else ``first_row`` onwards, as many as ``out`` holds) into ``out`` (rows, M*D), one kernel."""
    num_codebooks, codebook_size, piece = codebooks.shape
    dim = num_codebooks * piece
    rows = out.shape[0]
    if rows:
        block_t, block_n = 16, 128
        grid = (_cdiv(rows, block_t), _cdiv(dim, block_n))
        _rpq_rows_kernel[grid](
            ids if ids is not None else indices,
            indices,
            codebooks,
            out,
            first_row,
            rows,
            indices.shape[1],
            dim,
            CODEBOOK_SIZE=codebook_size,
            PIECE=piece,
            HAS_IDS=ids is not None,
            BLOCK_T=block_t,
            BLOCK_N=block_n,
        )
    return out


def decode_weight_t(codebooks: Tensor, indices: Tensor) -> Tensor:
    """W^T (in, out) of an RPQ Linear, decoded into a new temporary by one kernel."""
    out = torch.empty(indices.shape[1], codebooks.shape[0] * codebooks.shape[2], device=codebooks.device, dtype=codebooks.dtype)
    return decode_rows(codebooks, indices, out)


def linear_decode(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """Decode W^T into a temporary, then one cuBLAS matmul (the large-batch alternative)."""
    in_features = indices.shape[1]
    out_features = codebooks.shape[0] * codebooks.shape[2]
    weight_t = decode_weight_t(codebooks, indices)
    rows = x.reshape(-1, in_features).to(codebooks.dtype)
    out = torch.addmm(bias.to(rows.dtype), rows, weight_t) if bias is not None else rows @ weight_t
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


def embedding(ids: Tensor, codebooks: Tensor, indices: Tensor) -> Tensor:
    """Rows ``ids`` of the RPQ table (E[c, h*D + d] = codebooks[h, indices[h, c], d]); the rest is never decoded."""
    dim = codebooks.shape[0] * codebooks.shape[2]
    flat_ids = ids.reshape(-1)
    out = torch.empty(flat_ids.numel(), dim, device=codebooks.device, dtype=codebooks.dtype)
    return decode_rows(codebooks, indices, out, ids=flat_ids).reshape(*ids.shape, dim)


def code_scores(x: Tensor, codebooks: Tensor) -> Tensor:
    """``layout.code_scores`` (piece h of each token against every code of codebook h) in float32, without cuBLAS."""
    num_codebooks, codebook_size, piece = codebooks.shape
    rows = _rows(x.to(codebooks.dtype), num_codebooks * piece)
    tokens = rows.shape[0]
    scores = torch.empty(num_codebooks, tokens, codebook_size, device=x.device, dtype=torch.float32)
    if tokens:
        block_d = _next_power_of_2(piece)
        _rpq_code_scores_kernel[(num_codebooks, tokens)](
            rows, codebooks, scores, tokens, rows.stride(0), CODEBOOK_SIZE=codebook_size, PIECE=piece, BLOCK_D=block_d,
            BLOCK_K=max(16, min(_next_power_of_2(codebook_size), 4096 // block_d)),
        )
    return scores


def tied_head_scores(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None) -> Tensor:
    """Logits against an RPQ embedding table: one kernel scores every code, one sums each row's M scores."""
    num_codebooks, codebook_size, _ = codebooks.shape
    vocab = indices.shape[1]
    scores = code_scores(x, codebooks)  # (M, tokens, K)
    tokens = scores.shape[1]
    out = torch.empty(tokens, vocab, device=x.device, dtype=x.dtype)
    if tokens:
        block_t, block_v = (1, 512) if tokens == 1 else (16, 128)
        grid = (_cdiv(vocab, block_v), _cdiv(tokens, block_t))
        _rpq_tied_head_kernel[grid](
            scores,
            indices,
            bias if bias is not None else scores,
            out,
            tokens,
            vocab,
            NUM_CODEBOOKS=num_codebooks,
            CODEBOOK_SIZE=codebook_size,
            HAS_BIAS=bias is not None,
            BLOCK_T=block_t,
            BLOCK_V=block_v,
        )
    return out.reshape(*x.shape[:-1], vocab)


def tied_head_decode(x: Tensor, codebooks: Tensor, indices: Tensor, bias: Tensor | None, chunk_bytes: int) -> Tensor:
    """Logits for many tokens: decode the table a chunk of rows at a time into a temporary, cuBLAS each chunk."""
    num_codebooks, _, piece = codebooks.shape
    dim = num_codebooks * piece
    vocab = indices.shape[1]
    rows = x.reshape(-1, dim).to(codebooks.dtype)
    out = torch.empty(rows.shape[0], vocab, device=x.device, dtype=rows.dtype)
    chunk = max(1, min(vocab, chunk_bytes // (dim * codebooks.element_size())))
    table = torch.empty(chunk, dim, device=x.device, dtype=codebooks.dtype)
    for start in range(0, vocab, chunk):
        part = decode_rows(codebooks, indices, table[: min(chunk, vocab - start)], first_row=start)
        columns = out[:, start : start + part.shape[0]]  # row stride = vocab: cuBLAS writes it in place, no temporary
        if bias is None:
            torch.mm(rows, part.T, out=columns)
        else:
            torch.addmm(bias[start : start + part.shape[0]].to(rows.dtype), rows, part.T, out=columns)
    return out.reshape(*x.shape[:-1], vocab).to(x.dtype)
