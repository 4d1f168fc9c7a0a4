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
def unpack(row_ptrs, columns, width, mask, BITS: tl.constexpr, BYTES: tl.constexpr):
    """The codes at ``columns`` of the packed rows ``row_ptrs`` (uint8 pointers, broadcast against ``columns``).

    ``width``: bytes per row; bytes past it are not read (the last code of a row may end inside its last byte).
    """
    start = columns * BITS
    first = start >> 3
    word = tl.load(row_ptrs + first, mask=mask, other=0).to(tl.int32)
    for extra in tl.static_range(1, BYTES):
        more = tl.load(row_ptrs + first + extra, mask=mask & (first + extra < width), other=0).to(tl.int32)
        word = word | (more << (8 * extra))
    if BITS % 8 != 0:
        word = word >> (start & 7)
    return word & ((1 << BITS) - 1)
