"""The RPQ tensor layout (compatible with rpq-pytorch 0.0.2), in one place.

Linear, weight W (out, in), M codebooks, D = out / M:
    codebooks (M, K, D), indices (M, in),  W[h*D + d, c] = codebooks[h, indices[h, c], d]
Embedding, table E (n, dim), D = dim / M:
    codebooks (M, K, D), indices (M, n),   E[c, h*D + d] = codebooks[h, indices[h, c], d]

Both cut a "column" (a Linear input column, an embedding row) into M pieces of length D, and piece
h of column c is code indices[h, c] of codebook h. The functions below turn a dense weight into
the (M, n, D) pieces that k-means clusters, and codebooks + indices back into the dense weight.

Stored codes take ceil(log2 K) bits each, packed little-endian along the columns into bytes
(code c of a codebook occupies bits c*b .. c*b+b-1 of its row of bytes): at K = 256 that is one
``uint8`` per code, exactly rpq-pytorch's (M, n) layout. 5-bit codes over a multiple of 32 columns are
stored as two planes instead (format version 3, ``stored_as_planes``): the low 4 bits packed as 4-bit
codes, then the top bit packed as 1-bit codes, in the same number of bytes; both planes read in whole
bytes, and the 4-bit plane is what the byte-permute kernels look up. Codebooks are stored in a float
dtype, or as ``int8`` with one scale per codebook (``codebook_scales``, float16).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config.code_planes import stored_as_planes

LINEAR = "linear"
EMBEDDING = "embedding"


MAX_CODEBOOK_SIZE = 65536  # 16-bit codes
INT8 = "int8"  # the codebook storage with one float16 scale per codebook
CODEBOOK_DTYPES = {"int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def code_bits(codebook_size: int) -> int:
    """Bits per stored code: ceil(log2 K), at least 1."""
    if not 2 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook size must be between 2 and {MAX_CODEBOOK_SIZE}, got {codebook_size}")
    return max(1, math.ceil(math.log2(codebook_size)))


def packed_width(columns: int, bits: int) -> int:
    """Bytes per codebook row of packed codes."""
    return -(-columns * bits // 8)


def codebook_bits(codebook_dtype: str) -> int:
    """Bits per stored codebook value (the int8 form's scale is counted apart)."""
    return CODEBOOK_DTYPES[codebook_dtype].itemsize * 8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(M, n) integer codes below 2**bits -> (M, packed_width(n, bits)) uint8: the little-endian stream, or the
    two planes where ``stored_as_planes``."""
    if stored_as_planes(bits, codes.shape[1]):
        codes = codes.to(torch.int32)
        return torch.cat([pack_stream(codes & 15, 4), pack_stream(codes >> 4, 1)], dim=1)
    return pack_stream(codes, bits)


def unpack_codes(packed: Tensor, bits: int, columns: int, select: Tensor | None = None) -> Tensor:
    """Packed codes (``pack_codes``) -> (M, n) int64 codes, or only the columns ``select`` (any shape of ids, flattened)."""
    if stored_as_planes(bits, columns):
        low = unpack_stream(packed[:, : columns // 2], 4, columns, select)
        return low | (unpack_stream(packed[:, columns // 2 :], 1, columns, select) << 4)
    return unpack_stream(packed, bits, columns, select)


def planes_from_stream(packed: Tensor, bits: int, columns: int) -> Tensor:
    """Codes a format-2 checkpoint stored as a stream, in this format's layout (a copy where it differs)."""
    if not stored_as_planes(bits, columns):
        return packed
    return pack_codes(unpack_stream(packed, bits, columns), bits)


PACK_CHUNK_BYTES = 256 * 2**20  # bound on the bit-expanded temporaries of one slice of rows that pack_stream packs


def pack_stream(codes: Tensor, bits: int) -> Tensor:
    """(M, n) integer codes below 2**bits -> (M, packed_width(n, bits)) uint8, little-endian bit order.

    Packed a slice of rows at a time: every code is first spread to one byte per bit, which for a 7B-class model's
    head (49,152 x 4,096 codes) would otherwise take several GB at once."""
    if bits == 8:
        return codes.to(torch.uint8)
    num_books, columns = codes.shape
    width = packed_width(columns, bits)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    packed = torch.empty(num_books, width, dtype=torch.uint8, device=codes.device)
    rows = max(1, PACK_CHUNK_BYTES // (4 * width * 8))  # int32 bit bytes: the largest temporary per row
    for start in range(0, num_books, rows):
        part = codes[start : start + rows].to(torch.int32)
        stream = ((part[:, :, None] >> shifts) & 1).reshape(part.shape[0], columns * bits)
        stream = torch.nn.functional.pad(stream, (0, width * 8 - columns * bits))
        packed[start : start + rows] = (stream.view(part.shape[0], width, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return packed


def unpack_stream(packed: Tensor, bits: int, columns: int, select: Tensor | None = None) -> Tensor:
    """A little-endian stream of codes -> (M, n) int64 codes, or only the columns ``select``."""
    if bits == 8:
        codes = packed if select is None else packed[:, select.reshape(-1)]
        return codes.long()
    wanted = torch.arange(columns, device=packed.device) if select is None else select.reshape(-1).to(packed.device)
    start = wanted * bits
    first, shift = start >> 3, start & 7
    last = packed.shape[1] - 1
    word = torch.zeros(packed.shape[0], wanted.numel(), dtype=torch.int32, device=packed.device)
    for extra in range((7 + bits + 7) // 8):  # a code spans at most this many bytes
        word |= packed[:, (first + extra).clamp_(max=last)].to(torch.int32) << (8 * extra)
    return ((word >> shift) & ((1 << bits) - 1)).long()


def codebook_values(codebooks: Tensor, scales: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
    """(M, K, D) codebook values: an int8 codebook times its scale (exact in float32: 8 + 11 significant bits), in
    ``dtype``; None keeps float codebooks as stored and int8 ones in float32."""
    if scales is None:
        return codebooks if dtype is None else codebooks.to(dtype)
    values = codebooks.float() * scales.float()[:, None, None]
    return values if dtype is None else values.to(dtype)


def to_pieces(weight: Tensor, num_codebooks: int, layout: str) -> Tensor:
    """Dense weight -> (M, n, D) pieces: n columns, each cut into M pieces of length D."""
    if layout == LINEAR:
        out_features, in_features = weight.shape
        return weight.reshape(num_codebooks, out_features // num_codebooks, in_features).transpose(1, 2)
    if layout == EMBEDDING:
        rows, dim = weight.shape
        return weight.reshape(rows, num_codebooks, dim // num_codebooks).transpose(0, 1)
    raise ValueError(f"unknown RPQ layout {layout!r}")


def lookup(codebooks: Tensor, indices: Tensor) -> Tensor:
    """(M, K, D) codebooks and (M, n) codes -> (M, n, D) decoded pieces, one gather for all codebooks."""
    num_codebooks, codebook_size, piece = codebooks.shape
    offsets = torch.arange(num_codebooks, device=indices.device)[:, None] * codebook_size
    flat = codebooks.reshape(num_codebooks * codebook_size, piece)
    return flat[indices.long() + offsets]


def decode(codebooks: Tensor, indices: Tensor, layout: str) -> Tensor:
    """Codebooks + indices -> the dense weight: (out, in) for LINEAR, (n, dim) for EMBEDDING."""
    pieces = lookup(codebooks, indices)  # (M, n, D)
    num_codebooks, columns, piece = pieces.shape
    if layout == LINEAR:
        return pieces.transpose(1, 2).reshape(num_codebooks * piece, columns)
    if layout == EMBEDDING:
        return pieces.transpose(0, 1).reshape(columns, num_codebooks * piece)
    raise ValueError(f"unknown RPQ layout {layout!r}")


def split_dim(shape: tuple[int, int], layout: str) -> int:
    """The dimension that M must divide: out_features of a Linear, the embedding dim of a table."""
    return shape[0] if layout == LINEAR else shape[1]


def column_count(shape: tuple[int, int], layout: str) -> int:
    """How many columns (k-means points per codebook) a weight of this shape has."""
    return shape[1] if layout == LINEAR else shape[0]


def code_scores(x: Tensor, codebooks: Tensor) -> Tensor:
    """(..., M*D) inputs -> (M, tokens, K): piece h of each token against every code of codebook h, one bmm."""
    num_codebooks, _, piece = codebooks.shape
    rows = x.reshape(-1, num_codebooks, piece).transpose(0, 1)  # (M, tokens, D)
    return torch.bmm(rows.to(codebooks.dtype), codebooks.transpose(1, 2))


ROW_ALIGN = 8  # code_bins' row count is a multiple of this (aligned loads; the kernel masks past it)


def _narrowest_int(count: int) -> torch.dtype:
    """int16 for indices below 32768, else int32 (Triton and torch index with either)."""
    return torch.int16 if count <= torch.iinfo(torch.int16).max else torch.int32


def code_bins(indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Per codebook, the columns grouped by code into rows of ``width`` slots: the one-hot matrix in ELL form.

    Row r of codebook h holds up to ``width`` columns that all have code ``row_codes[h, r]`` (a code
    with more columns takes several rows; empty slots are -1). Then ``sum_r (sum of x over row r's
    slots) * codebooks[h, row_codes[h, r]]`` is output piece h: one gather of x per column and one
    codebook row per row, no scatter (the binned GPU kernel). ``width`` is the mean column count per
    code rounded up to a power of two (at most 16), so there are at most ``columns / width + K`` rows;
    the row count is the largest codebook's, rounded up to a multiple of 8 (the kernel masks the
    rest of its row block: padding to a power of two cost up to twice the memory). Slots are int16
    (int32 above 32767 columns), row codes int16 (int32 above 32767 codes): the bins live on the
    device beside the codes, so every byte counts against the compressed model's memory.
    Returns ``slots`` (M, rows, width) and ``row_codes`` (M, rows).
    """
    num_codebooks, columns = indices.shape
    width = 1 << max(0, min(4, math.ceil(math.log2(max(1.0, columns / codebook_size)))))
    codes, order = torch.sort(indices.long(), dim=1, stable=True)
    counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.long, device=indices.device).scatter_add_(
        1, codes, torch.ones_like(codes)
    )
    rows_per_code = (counts + width - 1) // width
    first_row = torch.cumsum(rows_per_code, 1) - rows_per_code
    run_start = torch.cumsum(counts, 1) - counts
    position = torch.arange(columns, device=indices.device) - run_start.gather(1, codes)  # place inside its code's run
    row = first_row.gather(1, codes) + position // width
    rows = -(-int(rows_per_code.sum(1).max()) // ROW_ALIGN) * ROW_ALIGN
    slot_dtype = _narrowest_int(columns)
    slots = torch.full((num_codebooks, rows * width), -1, dtype=slot_dtype, device=indices.device)
    slots.scatter_(1, row * width + position % width, order.to(slot_dtype))
    code_dtype = _narrowest_int(codebook_size)
    row_codes = torch.zeros(num_codebooks, rows, dtype=code_dtype, device=indices.device)
    row_codes.scatter_(1, row, codes.to(code_dtype))
    return slots.view(num_codebooks, rows, width), row_codes

