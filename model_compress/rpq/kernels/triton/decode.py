"""Decoding rows of the weight (or the embedding table) into a buffer: the embedding lookup and the large-batch
path (``W^T`` decoded, then cuBLAS)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import _cdiv


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
