"""Decoding packed codes into a buffer: rows of an embedding table (only the ids asked for), a Linear's W' for the
prompt path (decode, then cuBLAS), a chunk of a tied head's table.

Both layouts name an element by (column j, split index n): codebook h = n // D, piece d = n % D, value
``codebooks[h, code[h, j], d] * scale[h]``. An embedding's columns are its rows (out[t, n] for j = ids[t]); a
Linear's columns are its inputs (out[n, j]). One kernel writes either, through the output's two strides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.code_planes import stored_as_planes
from ..triton.common import _cdiv, _wait_for_inputs
from ..launch.direct_launch import DirectLaunch
from .codes import VECTOR_BITS, bytes_spanned, unpack, unpack_tile


@triton.jit
def _packed_decode_kernel(
    ids_ptr,
    codes_ptr,
    codebooks_ptr,
    scales_ptr,
    out_ptr,
    first_column,
    count,
    split,
    code_width,
    stride_column,
    stride_split,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    BITS: tl.constexpr,
    BYTES: tl.constexpr,
    HAS_IDS: tl.constexpr,
    VECTOR: tl.constexpr,
    PLANES: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    if HAS_IDS:  # the ids are an activation; without them only weights are read before the store
        _wait_for_inputs(PDL)
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_j = offs_j < count
    mask_n = offs_n < split
    if HAS_IDS:
        columns = tl.load(ids_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
    else:
        columns = (first_column + offs_j).to(tl.int64)
    heads = offs_n // PIECE
    mask = mask_n[:, None] & mask_j[None, :]
    code_rows = codes_ptr + heads.to(tl.int64)[:, None] * code_width
    if VECTOR:  # a contiguous run of columns: whole byte tiles
        codes = unpack_tile(code_rows, first_column + tl.program_id(0) * BLOCK_J, code_width, mask_n, BITS, BLOCK_J)
    else:
        codes = unpack(code_rows, columns[None, :], code_width, mask, BITS, BYTES, PLANES)
    values = tl.load(codebooks_ptr + (heads * (CODEBOOK_SIZE * PIECE) + offs_n - heads * PIECE)[:, None] + codes * PIECE,
                     mask=mask, other=0).to(tl.float32)
    if HAS_SCALES:
        values = values * tl.load(scales_ptr + heads, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if not HAS_IDS:
        _wait_for_inputs(PDL)
    targets = out_ptr + offs_j.to(tl.int64)[None, :] * stride_column + offs_n.to(tl.int64)[:, None] * stride_split
    tl.store(targets, values.to(out_ptr.dtype.element_ty), mask=mask)


def decode_plan(
    codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, columns: int, stride_column: int, stride_split: int,
    count: int, has_ids: bool = False, first_column: int = 0, pdl: bool = False,
) -> Callable[[Tensor, Tensor | None], None]:
    """A call ``(out, ids)`` that decodes ``count`` of the ``columns`` columns (``ids``, else ``first_column`` onwards)
    into ``out`` at the given strides, one kernel; the grid and constants worked out once. ``pdl``: launched as a
    programmatic dependent (``triton.common._wait_for_inputs``), the codes decoded while the kernel before ends."""
    num_codebooks, codebook_size, piece = codebooks.shape
    split = num_codebooks * piece
    if not count:
        return lambda out, ids: None
    block_j, block_n = 64, 64
    launch = DirectLaunch(
        _packed_decode_kernel, (_cdiv(count, block_j), _cdiv(split, block_n)), CODEBOOK_SIZE=codebook_size, PIECE=piece,
        BITS=bits, BYTES=bytes_spanned(bits), HAS_IDS=has_ids,
        VECTOR=not has_ids and bits in VECTOR_BITS and first_column * bits % 8 == 0, PLANES=stored_as_planes(bits, columns),
        HAS_SCALES=scales is not None, BLOCK_J=block_j, BLOCK_N=block_n, PDL=pdl, launch_pdl=pdl,
    )
    scales_or_books = scales if scales is not None else codebooks
    width = codes.shape[1]

    def decode(out: Tensor, ids: Tensor | None) -> None:
        launch(ids if ids is not None else codes, codes, codebooks, scales_or_books, out, first_column, count, split, width,
               stride_column, stride_split)

    return decode


def decode_packed(
    codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, columns: int, out: Tensor, stride_column: int,
    stride_split: int, count: int, ids: Tensor | None = None, first_column: int = 0,
) -> Tensor:
    """Decode ``count`` of the ``columns`` columns (``ids``, else ``first_column`` onwards) into ``out`` at the given
    strides, one kernel."""
    decode_plan(codes, codebooks, scales, bits, columns, stride_column, stride_split, count, ids is not None, first_column)(out, ids)
    return out


def decode_linear_plan(codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, in_features: int,
                       dtype: torch.dtype) -> Callable[[], Tensor]:
    """A call that returns W' (out, in) of a packed Linear in ``dtype``, a new temporary each time."""
    out_features = codebooks.shape[0] * codebooks.shape[2]
    decode = decode_plan(codes, codebooks, scales, bits, in_features, 1, in_features, in_features)
    device = codes.device

    def weight() -> Tensor:
        out = torch.empty(out_features, in_features, device=device, dtype=dtype)
        decode(out, None)
        return out

    return weight


def decode_linear_weight(codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, in_features: int,
                         dtype: torch.dtype) -> Tensor:
    """W' (out, in) of a packed Linear in ``dtype``, a new temporary."""
    return decode_linear_plan(codes, codebooks, scales, bits, in_features, dtype)()


def decode_table_rows(codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, rows: int, dtype: torch.dtype,
                      ids: Tensor | None = None, first_row: int = 0, count: int | None = None) -> Tensor:
    """Rows of a packed embedding table E' of ``rows`` rows (``ids``, else ``count`` rows from ``first_row``), (rows,
    dim) in ``dtype``."""
    dim = codebooks.shape[0] * codebooks.shape[2]
    count = ids.numel() if ids is not None else count
    out = torch.empty(count, dim, device=codes.device, dtype=dtype)
    return decode_packed(codes, codebooks, scales, bits, rows, out, dim, 1, count, ids=ids, first_column=first_row)
