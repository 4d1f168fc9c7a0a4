"""Layers of 4-bit codes and one 16-entry int8 table per output row, with the table looked up in registers by byte
permutes instead of loads: one fp16 token (a GEMV) and 2 to 64 on tensor cores (both behind ``nibble_linear``),
and W' decoded into a temporary for cuBLAS on prompts (``nibble_decode_weight``, any float dtype).

Why a kernel of its own: the general GEMV (``linear.py``) gathers each code's value with a load and converts it
to float32, so a large layer reaches about a fifth of the copy bandwidth. Here a row's table sits in four 32-bit
registers (entries 0-3, 4-7, 8-11, 12-15). Four codes are four nibbles of a 16-bit half-word, which is exactly
the selector ``prmt.b32`` takes, so two permutes look up four codes in entries 0-7 and 8-15, a third spreads the
codes' top bits into byte masks, and one ``lop3`` picks per byte. The bytes become fp16 pairs by a third permute
under the exponent of 1024 (``0x64``), then v / 128 = h / 128 - 9 exactly; pairs of x multiply them with
``fma.rn.f16x2``. Eight codes (one 32-bit word of the packed row) give one partial sum of eight fp16 products
(each at most |x|, so no overflow below |x| = 8192), added in float32; the row's scale times 128 comes last.
For several tokens the same lookup hands the eight values v / 128 to ``tl.dot`` instead.

The stored layout is ``layout.pack_codes`` at 4 bits: code c of a row at bit 4c, so code word j of a row holds
codes 8j .. 8j + 7 and x[8j .. 8j + 7] is the 16 bytes next to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.packed_routes import PackedTile
from ..triton.common import _cdiv, _rows, _store_tile, tile_counters
from .linear import input_split

# $0: float32 sum of the eight products; $1: eight 4-bit codes; $2-$5: the row's table (bytes are value + 128);
# $6, $7: x[8j .. 8j + 3] and x[8j + 4 .. 8j + 7] as fp16 pairs.
_EIGHT_CODES_TIMES_X = tl.constexpr("""
{
.reg .b32 sel, low, high, mask, shifted, bytes, pair0, pair1, acc, codes, inv128, minus9, x0, x1, x2, x3;
.reg .b16 first, second;
mov.b64 {x0, x1}, $6;
mov.b64 {x2, x3}, $7;
mov.b32 inv128, 0x20002000;
mov.b32 minus9, 0xC880C880;
mov.b32 codes, $1;
and.b32 sel, codes, 0x7777;
prmt.b32 low, $2, $3, sel;
prmt.b32 high, $4, $5, sel;
shl.b32 shifted, codes, 4;
prmt.b32 mask, shifted, codes, 0xD9C8;
lop3.b32 bytes, high, low, mask, 0xE4;
prmt.b32 pair0, bytes, 0x64646464, 0x4140;
prmt.b32 pair1, bytes, 0x64646464, 0x4342;
fma.rn.f16x2 pair0, pair0, inv128, minus9;
fma.rn.f16x2 pair1, pair1, inv128, minus9;
mul.rn.f16x2 acc, pair0, x0;
fma.rn.f16x2 acc, pair1, x1, acc;
shr.u32 codes, codes, 16;
and.b32 sel, codes, 0x7777;
prmt.b32 low, $2, $3, sel;
prmt.b32 high, $4, $5, sel;
shl.b32 shifted, codes, 4;
prmt.b32 mask, shifted, codes, 0xD9C8;
lop3.b32 bytes, high, low, mask, 0xE4;
prmt.b32 pair0, bytes, 0x64646464, 0x4140;
prmt.b32 pair1, bytes, 0x64646464, 0x4342;
fma.rn.f16x2 pair0, pair0, inv128, minus9;
fma.rn.f16x2 pair1, pair1, inv128, minus9;
fma.rn.f16x2 acc, pair0, x2, acc;
fma.rn.f16x2 acc, pair1, x3, acc;
mov.b32 {first, second}, acc;
add.rn.f16 first, first, second;
cvt.f32.f16 $0, first;
}
""")
# The same lookup without x: $0-$7 the eight values v / 128 (fp16) of codes 8j .. 8j + 7; $8: the code word; $9-$12: table.
_EIGHT_CODES = tl.constexpr("""
{
.reg .b32 sel, low, high, mask, shifted, bytes, pair, codes, inv128, minus9;
mov.b32 inv128, 0x20002000;
mov.b32 minus9, 0xC880C880;
mov.b32 codes, $8;
and.b32 sel, codes, 0x7777;
prmt.b32 low, $9, $10, sel;
prmt.b32 high, $11, $12, sel;
shl.b32 shifted, codes, 4;
prmt.b32 mask, shifted, codes, 0xD9C8;
lop3.b32 bytes, high, low, mask, 0xE4;
prmt.b32 pair, bytes, 0x64646464, 0x4140;
fma.rn.f16x2 pair, pair, inv128, minus9;
mov.b32 {$0, $1}, pair;
prmt.b32 pair, bytes, 0x64646464, 0x4342;
fma.rn.f16x2 pair, pair, inv128, minus9;
mov.b32 {$2, $3}, pair;
shr.u32 codes, codes, 16;
and.b32 sel, codes, 0x7777;
prmt.b32 low, $9, $10, sel;
prmt.b32 high, $11, $12, sel;
shl.b32 shifted, codes, 4;
prmt.b32 mask, shifted, codes, 0xD9C8;
lop3.b32 bytes, high, low, mask, 0xE4;
prmt.b32 pair, bytes, 0x64646464, 0x4140;
fma.rn.f16x2 pair, pair, inv128, minus9;
mov.b32 {$4, $5}, pair;
prmt.b32 pair, bytes, 0x64646464, 0x4342;
fma.rn.f16x2 pair, pair, inv128, minus9;
mov.b32 {$6, $7}, pair;
}
""")
_UNSIGNED = tl.constexpr(-2139062144) # 0x80808080 as an int32: int8 value v becomes byte v + 128


@triton.jit
def _row_tables(codebooks_ptr, rows):
    """The four 32-bit words of each row's 16-entry int8 table, bytes shifted to v + 128, as (rows, 1) tensors."""
    tables = tl.multiple_of(codebooks_ptr.to(tl.pointer_type(tl.int32)), 16) + rows * 4  # 16-byte aligned (a cast forgets it)
    t0 = (tl.load(tables) ^ _UNSIGNED)[:, None]
    t1 = (tl.load(tables + 1) ^ _UNSIGNED)[:, None]
    t2 = (tl.load(tables + 2) ^ _UNSIGNED)[:, None]
    t3 = (tl.load(tables + 3) ^ _UNSIGNED)[:, None]
    return t0, t1, t2, t3


@triton.jit
def _nibble_gemv_kernel(
    x_ptr,
    codes_ptr,
    codebooks_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    out_features,
    words_per_row,
    split_k,
    chunk_words,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)  # the grid is (tiles, 1, split), as _store_tile expects
    words_per_row = tl.multiple_of(words_per_row, 4)  # nibble_serves: in_features % 32 == 0
    chunk_words = tl.multiple_of(chunk_words, BLOCK_W)  # input_split hands out whole BLOCK_K slices
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_features
    rows = tl.where(mask_n, offs_n, 0)
    t0, t1, t2, t3 = _row_tables(codebooks_ptr, rows)
    code_rows = tl.multiple_of(codes_ptr.to(tl.pointer_type(tl.int32)), 16) + rows.to(tl.int64)[:, None] * words_per_row
    x_pairs = tl.multiple_of(x_ptr.to(tl.pointer_type(tl.int64)), 16)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    w_begin = pid_k * chunk_words
    w_end = tl.multiple_of(tl.minimum(w_begin + chunk_words, words_per_row), 4)  # masks whole 16-byte vectors
    for step in range(0, chunk_words, BLOCK_W):
        offs_w = w_begin + step + tl.arange(0, BLOCK_W)
        mask_w = offs_w < w_end
        words = tl.load(code_rows + offs_w[None, :], mask=mask_n[:, None] & mask_w[None, :], other=0)
        x_low = tl.load(x_pairs + 2 * offs_w, mask=mask_w, other=0)[None, :]
        x_high = tl.load(x_pairs + 2 * offs_w + 1, mask=mask_w, other=0)[None, :]
        acc += tl.inline_asm_elementwise(_EIGHT_CODES_TIMES_X, "=r,r,r,r,r,r,l,l", [words, t0, t1, t2, t3, x_low, x_high],
                                         dtype=tl.float32, is_pure=True, pack=1)
    sums = tl.sum(acc, axis=1) * (tl.load(scales_ptr + rows, mask=mask_n, other=0.0).to(tl.float32) * 128.0)
    one = tl.arange(0, 1)
    _store_tile(sums[None, :], partial_ptr, counter_ptr, bias_ptr, out_ptr, one, offs_n, one < 1, mask_n, 1, out_features,
                out_features, split_k, HAS_BIAS, SPLIT, 1, BLOCK_N)


@triton.jit
def _lookup_eight(words, t0, t1, t2, t3):
    """The values v / 128 (fp16) of codes 8j .. 8j + 7 of each code word, eight tensors of its shape."""
    return tl.inline_asm_elementwise(_EIGHT_CODES, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [words, t0, t1, t2, t3],
                                     dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _nibble_linear_kernel(
    x_ptr,
    codes_ptr,
    codebooks_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    tokens,
    out_features,
    words_per_row,
    stride_x,
    stride_out,
    split_k,
    chunk_words,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """2 to 64 tokens: each (BLOCK_N, 8 BLOCK_W) tile of W' / 128 looked up in registers, then ``tl.dot`` with x."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < tokens
    mask_n = offs_n < out_features
    rows = tl.where(mask_n, offs_n, 0)
    t0, t1, t2, t3 = _row_tables(codebooks_ptr, rows)
    code_rows = tl.multiple_of(codes_ptr.to(tl.pointer_type(tl.int32)), 16) + rows.to(tl.int64)[:, None] * words_per_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_begin = pid_k * chunk_words
    w_end = tl.minimum(w_begin + chunk_words, words_per_row)
    for step in range(0, chunk_words, BLOCK_W):
        offs_w = w_begin + step + tl.arange(0, BLOCK_W)
        words = tl.load(code_rows + offs_w[None, :], mask=mask_n[:, None] & (offs_w < w_end)[None, :], other=0)
        v0, v1, v2, v3, v4, v5, v6, v7 = _lookup_eight(words, t0, t1, t2, t3)
        # each join adds the minor axis, so the last join picks the lowest bit of e: column 8 j + e holds code 8 j + e
        w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        w = tl.reshape(w, (BLOCK_N, BLOCK_W * 8))
        offs_k = (w_begin + step) * 8 + tl.arange(0, BLOCK_W * 8)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask_m[:, None] & (offs_k < w_end * 8)[None, :],
                    other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    acc = acc * (tl.load(scales_ptr + rows, mask=mask_n, other=0.0).to(tl.float32) * 128.0)[None, :]
    _store_tile(acc, partial_ptr, counter_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, tokens, out_features,
                stride_out, split_k, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _nibble_decode_kernel(codes_ptr, codebooks_ptr, scales_ptr, out_ptr, out_features, words_per_row, BLOCK_N: tl.constexpr,
                          BLOCK_W: tl.constexpr):
    """W'[rows, 8 j + e] for a (BLOCK_N, BLOCK_W words) tile: looked up, scaled in float32, stored in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_n = offs_n < out_features
    rows = tl.where(mask_n, offs_n, 0)
    t0, t1, t2, t3 = _row_tables(codebooks_ptr, rows)
    code_rows = tl.multiple_of(codes_ptr.to(tl.pointer_type(tl.int32)), 16) + rows.to(tl.int64)[:, None] * words_per_row
    mask_w = offs_w < words_per_row
    words = tl.load(code_rows + offs_w[None, :], mask=mask_n[:, None] & mask_w[None, :], other=0)
    v0, v1, v2, v3, v4, v5, v6, v7 = _lookup_eight(words, t0, t1, t2, t3)
    w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))  # as in the tile kernel
    w = tl.reshape(w, (BLOCK_N, BLOCK_W * 8)).to(tl.float32)
    w = w * (tl.load(scales_ptr + rows, mask=mask_n, other=0.0).to(tl.float32) * 128.0)[:, None]
    offs_k = tl.program_id(1) * BLOCK_W * 8 + tl.arange(0, BLOCK_W * 8)
    in_features = words_per_row * 8
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * in_features + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_k < in_features)[None, :])


def nibble_serves(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, in_features: int) -> bool:
    """Whether ``nibble_linear`` computes this call: fp16 tokens, 4-bit codes, one 16-entry int8 table per output row
    with its scale, whole 16-byte vectors of code words (in_features a multiple of 32) and aligned buffers (one token
    reads x as 8-byte pairs, so its x is aligned too)."""
    return (
        x.dtype == torch.float16 and nibble_decode_serves(codes, codebooks, scales, bits, in_features)
        and (x.numel() != in_features or (x.data_ptr() % 16 == 0 and x.stride(-1) == 1))
    )


def nibble_decode_serves(codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, in_features: int) -> bool:
    """Whether ``nibble_decode_weight`` decodes this layer: ``nibble_serves``'s format and alignment, any x dtype."""
    return (
        bits == 4 and scales is not None and codebooks.dtype == torch.int8 and codebooks.shape[1:] == (16, 1)
        and codebooks.is_contiguous() and in_features % 32 == 0 and codes.is_contiguous() and codes.data_ptr() % 16 == 0
        and codebooks.data_ptr() % 16 == 0
    )


NIBBLE_DECODE_ROWS, NIBBLE_DECODE_WORDS = 32, 32  # one program: 32 rows x 256 inputs


def nibble_decode_weight(codes: Tensor, codebooks: Tensor, scales: Tensor, in_features: int, dtype: torch.dtype) -> Tensor:
    """W' (out, in) in ``dtype``, a new temporary (``nibble_decode_serves``)."""
    out_features = codebooks.shape[0]
    weight = torch.empty(out_features, in_features, device=codes.device, dtype=dtype)
    words_per_row = in_features // 8
    grid = (_cdiv(out_features, NIBBLE_DECODE_ROWS), _cdiv(words_per_row, NIBBLE_DECODE_WORDS))
    _nibble_decode_kernel[grid](codes, codebooks, scales, weight, out_features, words_per_row, BLOCK_N=NIBBLE_DECODE_ROWS,
                                BLOCK_W=NIBBLE_DECODE_WORDS, num_warps=4)
    return weight


def nibble_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, in_features: int,
                  tile: PackedTile, multiprocessors: int) -> Tensor:
    """x W'^T + b (``nibble_serves``): one token on the GEMV, more on tensor cores; ``tile.block_k`` counts codes."""
    out_features = codebooks.shape[0]
    rows = _rows(x, in_features)
    tokens = rows.shape[0]
    out = torch.empty(tokens, out_features, device=x.device, dtype=x.dtype)
    if not tokens:
        return out.reshape(*x.shape[:-1], out_features)
    words_per_row, block_w = in_features // 8, tile.block_k // 8
    tiles_n, tiles_m = _cdiv(out_features, tile.block_n), _cdiv(tokens, tile.block_m)
    split, chunk = input_split(in_features, tiles_n * tiles_m, tile, multiprocessors)
    if split > 1:
        partial = torch.empty(split * tokens * out_features, device=x.device, dtype=torch.float32)
        counter = tile_counters(tiles_n * tiles_m, x.device)
    else:
        partial = counter = out
    bias_or_out = bias if bias is not None else out
    if tokens == 1 and tile.block_m == 1:
        _nibble_gemv_kernel[(tiles_n, 1, split)](
            rows, codes, codebooks, scales, bias_or_out, out, partial, counter, out_features, words_per_row, split, chunk // 8,
            HAS_BIAS=bias is not None, BLOCK_N=tile.block_n, BLOCK_W=block_w, SPLIT=split > 1, num_warps=tile.num_warps,
            num_stages=tile.num_stages,
        )
    else:
        _nibble_linear_kernel[(tiles_n, tiles_m, split)](
            rows, codes, codebooks, scales, bias_or_out, out, partial, counter, tokens, out_features, words_per_row,
            rows.stride(0), out.stride(0), split, chunk // 8, HAS_BIAS=bias is not None, BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n, BLOCK_W=block_w, SPLIT=split > 1, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
    return out.reshape(*x.shape[:-1], out_features)
