"""The gather kernel (a few tokens): a program owns a (tokens x outputs) tile, gathers codebook rows per input slice
and multiplies them with x (tensor cores from 16 tokens), split-K with arrival counters."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..config.routes import TileConfig, heads_per_tile
from .common import INTERPRETED, _accumulate, _cdiv, programmatic_launch_supported, _next_power_of_2, _prefetch_codebook_slice, _prefetch_l2, _rows, _store_tile, split_buffers


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
        partial, counter = split_buffers(out, split, tiles_n * tiles_m)
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
        pdl = config.pdl and programmatic_launch_supported(x.device)
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
