"""Logits of a tied head over a packed table, each row decoded once in registers and never written.

logits[t, v] = sum_h sum_d x'[t, h D + d] * scale[h] * codebooks[h, code[h, v], d]. One program owns a block of
vocabulary rows for every token and walks the codebooks BLOCK_H at a time: it reads a (BLOCK_H, BLOCK_V) tile of
packed codes (the only traffic that grows with the vocabulary), gathers each piece's int8 (or 16-bit) values from
the small codebooks (on-chip after the first touch), and multiplies the tile by the tokens' pieces on tensor cores.

Why not score codes per token (a (tokens, M, K) table, then one gather per row and codebook): the gathers of one
codebook after another form a chain of dependent loads of 288 links for SmolLM2, and every extra token repeats
them. Here a tile's gathers are all in flight at once, and tokens share them: 16 tokens cost about what one does.

The head index (``head_index/``) scores with the same kernel and adds, in its epilogue, each row's bound on its
error, min(a[t] r[v], b[t] s[v]) (``RowBounds``): what its top-k reads is then the one (tokens, vocab) tensor written,
where the scores, the two products, their minimum and the sum would each be one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.code_planes import stored_as_planes
from ..triton.common import _cdiv, _next_power_of_2, _rows
from .codes import bytes_spanned, unpack

HEAD_BLOCK_V = 128
HEAD_BLOCK_H = 32  # codebooks per step: a tile of 32 x 128 codes keeps 4,096 gathers in flight per program
MIN_DOT_ROWS = 16  # tensor cores take 16 or more token rows; fewer are padded with masked zeros


class RowBounds(NamedTuple):
    """min(token_scale[t] * row_error[v], metric_scale[t] * metric_error[v]), float32, added to every logit (the second
    product left out where ``metric_scale`` is None)."""

    token_scale: Tensor
    row_error: Tensor
    metric_scale: Tensor | None = None
    metric_error: Tensor | None = None


@triton.jit
def _packed_head_kernel(
    x_ptr, codes_ptr, codebooks_ptr, scales_ptr, bias_ptr, token_scale_ptr, row_error_ptr, metric_scale_ptr,
    metric_error_ptr, out_ptr, tokens, vocab, code_width, stride_x, stride_out,
    NUM_BOOKS: tl.constexpr, CODEBOOK_SIZE: tl.constexpr, PIECE: tl.constexpr, BITS: tl.constexpr, BYTES: tl.constexpr,
    PLANES: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, BOUNDS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_t = tl.arange(0, BLOCK_T)
    mask_v = offs_v < vocab
    mask_t = offs_t < tokens
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for first in range(0, NUM_BOOKS, BLOCK_H):
        heads = first + tl.arange(0, BLOCK_H)
        mask_h = heads < NUM_BOOKS
        mask = mask_h[:, None] & mask_v[None, :]
        codes = unpack(codes_ptr + heads.to(tl.int64)[:, None] * code_width, offs_v[None, :], code_width, mask, BITS, BYTES,
                       PLANES)
        value_ptrs = codebooks_ptr + (heads * (CODEBOOK_SIZE * PIECE))[:, None] + codes * PIECE
        x_ptrs = x_ptr + offs_t[:, None] * stride_x + (heads * PIECE)[None, :]
        x_mask = mask_t[:, None] & mask_h[None, :]
        for d in tl.static_range(PIECE):
            piece = tl.load(x_ptrs + d, mask=x_mask, other=0.0).to(tl.float32)
            if HAS_SCALES:
                piece = piece * tl.load(scales_ptr + heads, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            values = tl.load(value_ptrs + d, mask=mask, other=0)
            if DOT_IEEE:
                acc += tl.dot(piece, values.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(piece.to(x_ptr.dtype.element_ty), values.to(x_ptr.dtype.element_ty))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if BOUNDS > 0:  # 1: the plain bound, 2: the smaller of it and the metric bound
        scale = tl.load(token_scale_ptr + offs_t, mask=mask_t, other=0.0)
        bound = scale[:, None] * tl.load(row_error_ptr + offs_v, mask=mask_v, other=0.0)[None, :]
        if BOUNDS == 2:
            metric = tl.load(metric_scale_ptr + offs_t, mask=mask_t, other=0.0)
            bound = tl.minimum(bound, metric[:, None] * tl.load(metric_error_ptr + offs_v, mask=mask_v, other=0.0)[None, :])
        acc += bound
    tl.store(out_ptr + offs_t[:, None] * stride_out + offs_v[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_v[None, :])


def packed_head(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, vocab: int,
                bias: Tensor | None, block_v: int = HEAD_BLOCK_V, block_h: int = HEAD_BLOCK_H,
                out_dtype: torch.dtype | None = None, bounds: RowBounds | None = None) -> Tensor:
    """Logits (..., vocab) of rotated hidden states ``x`` against a packed table (``vocab`` rows), for a few tokens.

    ``codebooks`` (M, K, D) int8 with ``scales`` (M,), or 16-bit / float32 without; x in float16, bfloat16 or float32
    (the tensor-core product runs in x's dtype, float32 in IEEE precision). ``block_v`` rows by ``block_h``
    codebooks per step (powers of two, ``block_h`` at least 16). ``out_dtype``: the logits' dtype (x's by default;
    float32 keeps the float32 sums unrounded, which the head index's certificate counts on). ``bounds``: rows' error
    bounds added in the epilogue (float32 tensors, one value per token of ``x`` and per row).
    """
    num_codebooks, codebook_size, piece = codebooks.shape
    rows = _rows(x, x.shape[-1])
    tokens = rows.shape[0]
    out = torch.empty(tokens, vocab, device=x.device, dtype=out_dtype or x.dtype)
    kind = 0 if bounds is None else 1 if bounds.metric_scale is None else 2
    bound_tensors = (out,) * 4 if bounds is None else tuple(out if t is None else t for t in bounds)
    if tokens:
        _packed_head_kernel[(_cdiv(vocab, block_v),)](
            rows, codes, codebooks, scales if scales is not None else codebooks, bias if bias is not None else out,
            *bound_tensors, out, tokens, vocab, codes.shape[1], rows.stride(0), out.stride(0),
            NUM_BOOKS=num_codebooks, CODEBOOK_SIZE=codebook_size, PIECE=piece, BITS=bits, BYTES=bytes_spanned(bits),
            PLANES=stored_as_planes(bits, vocab), HAS_SCALES=scales is not None, HAS_BIAS=bias is not None, BOUNDS=kind,
            BLOCK_T=max(MIN_DOT_ROWS, _next_power_of_2(tokens)), BLOCK_H=block_h, BLOCK_V=block_v,
            DOT_IEEE=x.dtype == torch.float32, num_warps=4 if tokens <= 16 else 8,
        )
    return out.reshape(*x.shape[:-1], vocab)
