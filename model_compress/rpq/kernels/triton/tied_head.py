"""The tied LM head: per-codebook code scores, then a sum of each vocabulary row's M scores (the table is never
decoded); or chunks of the table decoded for cuBLAS at many tokens."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import _cdiv, _next_power_of_2, _rows
from .decode import decode_rows


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
