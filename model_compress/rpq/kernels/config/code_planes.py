"""Which codes format 3 stores as bit planes: plain data that the torch layout (``kernels/layout.py``) and the Triton
kernels (``kernels/packed``) both read, importable without Triton."""

from __future__ import annotations

PLANE_BITS = 5  # stored as a 4-bit plane (the low bits, two codes a byte), then a 1-bit plane (the top bit)
PLANE_COLUMNS = 32  # ... where a row has a multiple of this many codes: both planes are whole 32-bit words


def stored_as_planes(bits: int, columns: int) -> bool:
    """Whether codes of ``bits`` bits over ``columns`` columns are stored as a 4-bit and a 1-bit plane (format 3)."""
    return bits == PLANE_BITS and columns % PLANE_COLUMNS == 0
