"""Reading packed codes inside a kernel: b-bit codes, little-endian along a row of bytes (``layout.pack_codes``)."""

from __future__ import annotations

import math

import triton
import triton.language as tl


def bytes_spanned(bits: int) -> int:
    """The most bytes one b-bit code can touch: codes start at multiples of b bits, so at most at bit 8 - gcd(b, 8)
    of a byte (1 byte for 1, 2, 4 and 8 bits; 2 for 3, 5, 6, 7, 12 and 16)."""
    largest_shift = 0 if bits % 8 == 0 else 8 - math.gcd(bits, 8)
    return -(-(largest_shift + bits) // 8)


@triton.jit
def unpack(row_ptrs, columns, width, mask, BITS: tl.constexpr, BYTES: tl.constexpr, PLANES: tl.constexpr):
    """The codes at ``columns`` of the packed rows ``row_ptrs`` (uint8 pointers, broadcast against ``columns``).

    ``width``: bytes per row; bytes past it are not read (the last code of a row may end inside its last byte).
    PLANES (``layout.stored_as_planes``): 5-bit codes as a 4-bit plane of width * 4 / 5 bytes, then a 1-bit plane.
    """
    if PLANES:
        low = tl.load(row_ptrs + (columns >> 1), mask=mask, other=0).to(tl.int32)
        high = tl.load(row_ptrs + (width * 4) // 5 + (columns >> 3), mask=mask, other=0).to(tl.int32)
        return ((low >> ((columns & 1) * 4)) & 15) | (((high >> (columns & 7)) & 1) << 4)
    start = columns * BITS
    first = start >> 3
    word = tl.load(row_ptrs + first, mask=mask, other=0).to(tl.int32)
    for extra in tl.static_range(1, BYTES):
        more = tl.load(row_ptrs + first + extra, mask=mask & (first + extra < width), other=0).to(tl.int32)
        word = word | (more << (8 * extra))
    if BITS % 8 != 0:
        word = word >> (start & 7)
    return word & ((1 << BITS) - 1)


VECTOR_BITS = (1, 2, 4, 8)  # widths whose codes never straddle a byte: read as whole byte tiles, split in registers


@triton.jit
def unpack_tile(row_ptrs, first_column, width, mask_rows, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``first_column .. first_column + BLOCK_K`` of each packed row, for BITS in 1, 2, 4, 8.

    One contiguous byte tile per row (vector loads), then the 8 / BITS codes of each byte split out with shifts and
    put back in column order by ``tl.interleave`` (code c sits at bits c * BITS of the row's little-endian stream).
    ``first_column * BITS`` must be a multiple of 8. Returns (rows, BLOCK_K) int32; bytes past ``width`` read as 0.
    """
    offs_b = (first_column * BITS) // 8 + tl.arange(0, BLOCK_K * BITS // 8)
    raw = tl.load(row_ptrs + offs_b[None, :], mask=mask_rows[:, None] & (offs_b < width)[None, :], other=0).to(tl.int32)
    if BITS == 8:
        codes = raw
    elif BITS == 4:
        codes = tl.interleave(raw & 15, raw >> 4)
    elif BITS == 2:
        codes = tl.interleave(tl.interleave(raw & 3, (raw >> 4) & 3), tl.interleave((raw >> 2) & 3, raw >> 6))
    else:
        even = tl.interleave(tl.interleave(raw & 1, (raw >> 4) & 1), tl.interleave((raw >> 2) & 1, (raw >> 6) & 1))
        odd = tl.interleave(tl.interleave((raw >> 1) & 1, (raw >> 5) & 1), tl.interleave((raw >> 3) & 1, raw >> 7))
        codes = tl.interleave(even, odd)
    return codes


@triton.jit
def row_pointers(codes_ptr, codebooks_ptr, offs_n, code_width, CODEBOOK_SIZE: tl.constexpr, PIECE: tl.constexpr):
    """For output rows ``offs_n`` of a LINEAR layout: their codebooks (heads), packed code rows and codebook value rows
    (piece d = offs_n % PIECE of every code), as (rows, 1) pointers."""
    heads = offs_n // PIECE
    code_rows = codes_ptr + heads.to(tl.int64)[:, None] * code_width
    value_rows = codebooks_ptr + (heads * (CODEBOOK_SIZE * PIECE) + (offs_n - heads * PIECE))[:, None]
    return heads, code_rows, value_rows


@triton.jit
def weight_tile(code_rows, value_rows, first, offs_k, mask_n, mask_k, code_width, PIECE: tl.constexpr, BITS: tl.constexpr,
                BYTES: tl.constexpr, VECTOR: tl.constexpr, PLANES: tl.constexpr, BLOCK_K: tl.constexpr):
    """W'[rows, first .. first + BLOCK_K] as stored (int8 or float, before the scales): codes read (whole byte tiles where
    VECTOR), then their codebook values gathered."""
    mask = mask_n[:, None] & mask_k[None, :]
    if VECTOR:
        codes = unpack_tile(code_rows, first, code_width, mask_n, BITS, BLOCK_K)
    else:
        codes = unpack(code_rows, offs_k[None, :], code_width, mask, BITS, BYTES, PLANES)
    return tl.load(value_rows + codes * PIECE, mask=mask, other=0)
