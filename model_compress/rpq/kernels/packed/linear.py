"""y = x W'^T + b straight from packed codes (one token to a few dozen): each program decodes its (outputs x inputs)
tile of W' in registers and multiplies it with x, never writing W'.

W'[r, c] = codebooks[h, code[h, c], d] * scale[h] with h = r // D, d = r % D (``layout``'s LINEAR form): one small
table per output row at D = 1, a table of D-row vectors otherwise. One token takes a broadcast multiply-sum, more
take tensor cores (``tl.dot``, 16 rows and up). Split-K with arrival counters (``common._store_tile``) gives a
narrow layer enough programs without another launch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.code_planes import stored_as_planes
from ..config.packed_routes import PackedTile
from ..triton.common import _cdiv, _rows, _store_tile, _tile_rows, split_scratch, tile_counters
from ..launch.direct_launch import DirectLaunch
from .codes import VECTOR_BITS, bytes_spanned, row_pointers, weight_tile


@triton.jit
def _packed_linear_kernel(
    x_ptr,
    codes_ptr,
    codebooks_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    tokens,
    in_features,
    out_features,
    code_width,
    stride_x,
    stride_out,
    split_k,
    chunk_k,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    BITS: tl.constexpr,
    BYTES: tl.constexpr,
    VECTOR: tl.constexpr,
    PLANES: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_k = tl.program_id(2)
    offs_m, offs_n, mask_m, mask_n = _tile_rows(tokens, out_features, BLOCK_M, BLOCK_N)
    heads, code_rows, value_rows = row_pointers(codes_ptr, codebooks_ptr, offs_n, code_width, CODEBOOK_SIZE, PIECE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * chunk_k
    k_end = tl.minimum(k_begin + chunk_k, in_features)
    for step in range(0, chunk_k, BLOCK_K):
        offs_k = k_begin + step + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = weight_tile(code_rows, value_rows, k_begin + step, offs_k, mask_n, mask_k, code_width, PIECE, BITS, BYTES, VECTOR,
                        PLANES, BLOCK_K).to(x.dtype)
        if USE_DOT and DOT_IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        elif USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        else:  # one token (or a few): rows of W' times x, summed along the inputs
            acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    if HAS_SCALES:  # int8 codebooks: one scale per codebook, applied once to the finished sums
        acc = acc * tl.load(scales_ptr + heads, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store_tile(acc, partial_ptr, counter_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, tokens, out_features,
                stride_out, split_k, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _packed_gemv_kernel(
    x_ptr,
    codes_ptr,
    codebooks_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    in_features,
    out_features,
    code_width,
    split_k,
    chunk_k,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    BITS: tl.constexpr,
    BYTES: tl.constexpr,
    VECTOR: tl.constexpr,
    PLANES: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """One token: products accumulate elementwise in a (BLOCK_N, BLOCK_K) tile and are summed across once, at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)  # the grid is (tiles, 1, split), as _store_tile expects
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_features
    heads, code_rows, value_rows = row_pointers(codes_ptr, codebooks_ptr, offs_n, code_width, CODEBOOK_SIZE, PIECE)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_begin = pid_k * chunk_k
    k_end = tl.minimum(k_begin + chunk_k, in_features)
    for step in range(0, chunk_k, BLOCK_K):
        offs_k = k_begin + step + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = weight_tile(code_rows, value_rows, k_begin + step, offs_k, mask_n, mask_k, code_width, PIECE, BITS, BYTES, VECTOR,
                        PLANES, BLOCK_K)
        acc += w.to(tl.float32) * x[None, :]
    sums = tl.sum(acc, axis=1)
    if HAS_SCALES:
        sums = sums * tl.load(scales_ptr + heads, mask=mask_n, other=0.0).to(tl.float32)
    one = tl.arange(0, 1)
    _store_tile(sums[None, :], partial_ptr, counter_ptr, bias_ptr, out_ptr, one, offs_n, one < 1, mask_n, 1, out_features,
                out_features, split_k, HAS_BIAS, SPLIT, 1, BLOCK_N)


@dataclass(frozen=True)
class PlanInput:
    """What a plan keeps of the input it was made for: token count, the output's shape, device and dtype, and whether
    the kernel reads x itself at ``stride`` (``x`` a view of its rows) or a contiguous copy of the rows."""

    tokens: int
    out_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    as_rows: bool
    stride: int

    def output(self) -> Tensor:
        return torch.empty(self.out_shape, device=self.device, dtype=self.dtype)


def plan_input(x: Tensor, in_features: int, out_features: int) -> PlanInput:
    """``PlanInput`` of ``x`` for an in -> out layer."""
    rows = _rows(x, in_features)
    return PlanInput(rows.shape[0], (*x.shape[:-1], out_features), x.device, x.dtype, rows.data_ptr() == x.data_ptr(),
                     rows.stride(0))


def input_split(in_features: int, tiles: int, tile: PackedTile, multiprocessors: int) -> tuple[int, int]:
    """(programs per output tile, inputs each covers): split until about ``tile.programs_per_sm`` programs run per
    multiprocessor, at most ``tile.max_split``, each covering whole BLOCK_K slices."""
    steps = _cdiv(in_features, tile.block_k)
    split = max(1, min(steps, tile.max_split, tile.programs_per_sm * multiprocessors // max(1, tiles)))
    chunk = _cdiv(steps, split) * tile.block_k
    return _cdiv(in_features, chunk), chunk


def packed_linear_plan(
    x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int, in_features: int,
    tile: PackedTile, multiprocessors: int,
) -> Callable[[Tensor], Tensor]:
    """``packed_linear`` as a call for inputs shaped, strided, typed and aligned like ``x``: grid, split and constants
    worked out once."""
    num_codebooks, codebook_size, piece = codebooks.shape
    out_features = num_codebooks * piece
    rows = _rows(x, in_features)
    cast = not rows.dtype.is_floating_point or rows.dtype == torch.float64
    tokens = rows.shape[0]
    out_shape = (*x.shape[:-1], out_features)
    device, dtype = x.device, x.dtype
    if not tokens:
        return lambda x: torch.empty(out_shape, device=device, dtype=dtype)
    as_rows = rows.data_ptr() == x.data_ptr() and not cast  # the kernel reads x itself at the rows' stride
    stride_x = rows.stride(0) if not cast else in_features
    tiles_n, tiles_m = _cdiv(out_features, tile.block_n), _cdiv(tokens, tile.block_m)
    split, chunk = input_split(in_features, tiles_n * tiles_m, tile, multiprocessors)
    counter = tile_counters(tiles_n * tiles_m, device) if split > 1 else None
    scales_or_books = scales if scales is not None else codebooks
    constants = dict(CODEBOOK_SIZE=codebook_size, PIECE=piece, BITS=bits, BYTES=bytes_spanned(bits),
                     VECTOR=bits in VECTOR_BITS and tile.block_k * bits % 8 == 0, PLANES=stored_as_planes(bits, in_features),
                     HAS_SCALES=scales is not None, HAS_BIAS=bias is not None, BLOCK_K=tile.block_k, SPLIT=split > 1,
                     BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages)

    def inputs(x: Tensor) -> Tensor:
        if as_rows:
            return x
        rows = _rows(x, in_features)
        return rows.float() if cast else rows

    def buffers() -> tuple[Tensor, Tensor, Tensor]:
        out = torch.empty(out_shape, device=device, dtype=dtype)
        return out, *split_scratch(out, split, counter)

    if tokens == 1 and tile.block_m == 1:
        gemv = DirectLaunch(_packed_gemv_kernel, (tiles_n, 1, split), **constants)

        def run(x: Tensor) -> Tensor:
            out, partial, counters = buffers()
            gemv(inputs(x), codes, codebooks, scales_or_books, out if bias is None else bias, out, partial, counters,
                 in_features, out_features, codes.shape[1], split, chunk)
            return out

        return run
    linear = DirectLaunch(_packed_linear_kernel, (tiles_n, tiles_m, split), USE_DOT=tile.block_m >= 16,
                          DOT_IEEE=rows.dtype == torch.float32 or cast, BLOCK_M=tile.block_m, **constants)

    def run_tokens(x: Tensor) -> Tensor:
        out, partial, counters = buffers()
        linear(inputs(x), codes, codebooks, scales_or_books, out if bias is None else bias, out, partial, counters, tokens,
               in_features, out_features, codes.shape[1], stride_x, out_features, split, chunk)
        return out

    return run_tokens


def packed_linear(
    x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int, in_features: int,
    tile: PackedTile, multiprocessors: int,
) -> Tensor:
    """x W'^T + b for x already in the layer's (rotated) basis; ``codes`` packed at ``bits`` (M, width) uint8.

    The inputs are split until about ``tile.programs_per_sm`` programs run per multiprocessor (latency hiding for
    a narrow layer), never below one BLOCK_K slice per program. One token takes the GEMV kernel.
    """
    return packed_linear_plan(x, codes, codebooks, scales, bias, bits, in_features, tile, multiprocessors)(x)
