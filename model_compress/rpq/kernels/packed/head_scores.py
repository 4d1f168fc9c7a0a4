"""Logits of a tied head over a packed table for one token or a few, the table read in place: asymmetric scores.

logits[t, v] = sum_h S[t, h, code[h, v]], with S[t, h, k] = scale[h] * sum_d x'[t, h D + d] * codebooks[h, k, d]:
the token's piece against every entry of every codebook, a small table (M x K floats per token, 147 KB for
SmolLM2's head), made first by one launch. Then one program per block of vocabulary rows and token walks the
codebooks BLOCK_H at a time: it reads a (BLOCK_H, BLOCK_V) tile of packed codes, the only traffic that grows with
the vocabulary (12 MB for SmolLM2's 49,152 rows of 288 7-bit codes, where the decoded fp16 table is 57 MB), and
gathers each code's score. Neighbouring rows of one codebook gather from the same K scores, a few cache lines, so
a warp's gathers stay in L1; nothing of the table is decoded or written.

``packed/head.py`` decodes rows in registers for the tensor cores instead; both against the decoded table and cuBLAS
(the route the head takes by default) are what ``benchmarks/rpq/head_route.py`` measures.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.code_planes import stored_as_planes
from ..triton.common import _cdiv, _next_power_of_2, _rows, _wait_for_inputs
from .codes import bytes_spanned, unpack

SCORE_BLOCK_H = 16  # codebooks per program of the score table
SUM_BLOCK_V = 256  # vocabulary rows per program of the gather-sum
SUM_BLOCK_H = 16  # codebooks per step of the gather-sum: a 16 x 256 tile of codes, 4,096 gathers in flight


@triton.jit
def _score_table_kernel(
    x_ptr, codebooks_ptr, scales_ptr, scores_ptr, stride_x, num_books,
    CODEBOOK_SIZE: tl.constexpr, PIECE: tl.constexpr, HAS_SCALES: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    entries = tl.arange(0, BLOCK_K)
    mask_h = heads < num_books
    mask = mask_h[:, None] & (entries < CODEBOOK_SIZE)[None, :]
    values = codebooks_ptr + (heads * (CODEBOOK_SIZE * PIECE))[:, None] + entries[None, :] * PIECE
    acc = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
    for d in tl.static_range(PIECE):
        piece = tl.load(x_ptr + token * stride_x + heads * PIECE + d, mask=mask_h, other=0.0).to(tl.float32)
        acc += piece[:, None] * tl.load(values + d, mask=mask, other=0).to(tl.float32)
    if HAS_SCALES:
        acc *= tl.load(scales_ptr + heads, mask=mask_h, other=0.0).to(tl.float32)[:, None]
    rows = scores_ptr + token * num_books * CODEBOOK_SIZE + heads[:, None] * CODEBOOK_SIZE
    tl.store(rows + entries[None, :], acc, mask=mask)


@triton.jit
def _score_sum_kernel(
    scores_ptr, codes_ptr, bias_ptr, out_ptr, vocab, code_width, stride_out, num_books,
    CODEBOOK_SIZE: tl.constexpr, BITS: tl.constexpr, BYTES: tl.constexpr, PLANES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr,
):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    token = tl.program_id(1).to(tl.int64)
    mask_v = offs_v < vocab
    token_scores = scores_ptr + token * num_books * CODEBOOK_SIZE
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    heads = tl.arange(0, BLOCK_H)  # the first step's codes before the scores exist (PDL), each next step's one ahead
    mask = (heads < num_books)[:, None] & mask_v[None, :]
    codes = unpack(codes_ptr + heads.to(tl.int64)[:, None] * code_width, offs_v[None, :], code_width, mask, BITS, BYTES, PLANES)
    _wait_for_inputs(PDL)
    for first in range(0, num_books, BLOCK_H):
        heads = first + tl.arange(0, BLOCK_H)
        mask = (heads < num_books)[:, None] & mask_v[None, :]
        acc += tl.sum(tl.load(token_scores + heads[:, None] * CODEBOOK_SIZE + codes, mask=mask, other=0.0), axis=0)
        following = heads + BLOCK_H
        ahead = (following < num_books)[:, None] & mask_v[None, :]
        codes = unpack(codes_ptr + following.to(tl.int64)[:, None] * code_width, offs_v[None, :], code_width, ahead, BITS,
                       BYTES, PLANES)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs_v, acc.to(out_ptr.dtype.element_ty), mask=mask_v)


def score_table(x: Tensor, codebooks: Tensor, scales: Tensor | None, pdl: bool = False) -> Tensor:
    """S (tokens, M, K) float32 for the rows of ``x`` (tokens, M * D): each piece of x against each codebook entry.
    ``pdl``: launched as a programmatic dependent (``triton.common._wait_for_inputs``)."""
    num_books, codebook_size, piece = codebooks.shape
    tokens = x.shape[0]
    scores = torch.empty(tokens, num_books, codebook_size, device=x.device, dtype=torch.float32)
    if tokens:
        _score_table_kernel[(tokens, _cdiv(num_books, SCORE_BLOCK_H))](
            x, codebooks, scales if scales is not None else codebooks, scores, x.stride(0), num_books,
            CODEBOOK_SIZE=codebook_size, PIECE=piece, HAS_SCALES=scales is not None, BLOCK_H=SCORE_BLOCK_H,
            BLOCK_K=_next_power_of_2(codebook_size), PDL=pdl, launch_pdl=pdl,
        )
    return scores


def scored_head(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, vocab: int,
                bias: Tensor | None, block_v: int = SUM_BLOCK_V, block_h: int = SUM_BLOCK_H, pdl: bool = False) -> Tensor:
    """Logits (..., vocab) of rotated hidden states ``x`` against a packed table (``vocab`` rows), in x's dtype: the
    score table, then one gather-sum over the codes. ``codebooks`` (M, K, D) int8 with ``scales`` (M,), or a float
    dtype without; ``block_v`` rows by ``block_h`` codebooks per step (powers of two). ``pdl``: both launched as
    programmatic dependents, the gather-sum's first codes read while the score table is made."""
    rows = _rows(x, x.shape[-1])
    tokens = rows.shape[0]
    num_books, codebook_size, _ = codebooks.shape
    scores = score_table(rows, codebooks, scales, pdl)
    out = torch.empty(tokens, vocab, device=x.device, dtype=x.dtype)
    if tokens:
        _score_sum_kernel[(_cdiv(vocab, block_v), tokens)](
            scores, codes, bias if bias is not None else out, out, vocab, codes.shape[1], out.stride(0), num_books,
            CODEBOOK_SIZE=codebook_size, BITS=bits, BYTES=bytes_spanned(bits), PLANES=stored_as_planes(bits, vocab),
            HAS_BIAS=bias is not None, BLOCK_H=block_h, BLOCK_V=block_v, PDL=pdl, launch_pdl=pdl,
        )
    return out.reshape(*x.shape[:-1], vocab)
