"""Logits of a tied head over a packed table without decoding it: score every code once, then sum each row's scores.

logits[t, v] = sum_h scores[t, h, code[h, v]], with scores[t, h, k] = x'_h . codebooks[h, k] * scale[h] (a small
(tokens, M, K) float32 table made by one batched product). One program owns a block of vocabulary rows for every
token: it reads each row's M packed codes once (the only traffic that grows with the vocabulary) and gathers the
scores from on-chip caches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.code_planes import stored_as_planes
from ..triton.common import _cdiv, _next_power_of_2
from .codes import bytes_spanned, unpack

HEAD_BLOCK_V = 128


@triton.jit
def _packed_head_kernel(
    scores_ptr,
    codes_ptr,
    bias_ptr,
    out_ptr,
    tokens,
    vocab,
    code_width,
    stride_out,
    NUM_BOOKS: tl.constexpr,
    CODEBOOK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    BYTES: tl.constexpr,
    PLANES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_t = tl.arange(0, BLOCK_T)
    mask_v = offs_v < vocab
    mask_t = offs_t < tokens
    mask = mask_t[:, None] & mask_v[None, :]
    token_scores = scores_ptr + offs_t[:, None] * (NUM_BOOKS * CODEBOOK_SIZE)
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for head in range(NUM_BOOKS):
        codes = unpack(codes_ptr + head * code_width, offs_v, code_width, mask_v, BITS, BYTES, PLANES)
        acc += tl.load(token_scores + head * CODEBOOK_SIZE + codes[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_out + offs_v[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def code_scores(x: Tensor, codebook_values: Tensor) -> Tensor:
    """(tokens, M, K) float32: piece h of each (rotated) token against every code of codebook h."""
    num_codebooks, _, piece = codebook_values.shape
    pieces = x.reshape(-1, num_codebooks, piece).transpose(0, 1).float()  # (M, tokens, D)
    return torch.bmm(pieces, codebook_values.float().transpose(1, 2)).transpose(0, 1).contiguous()


def packed_head(x: Tensor, codes: Tensor, codebook_values: Tensor, bits: int, vocab: int, bias: Tensor | None) -> Tensor:
    """Logits (..., vocab) of rotated hidden states ``x`` against a packed table (``vocab`` rows), for a few tokens."""
    num_codebooks, codebook_size, _ = codebook_values.shape
    scores = code_scores(x, codebook_values)
    tokens = scores.shape[0]
    out = torch.empty(tokens, vocab, device=x.device, dtype=x.dtype)
    if tokens:
        _packed_head_kernel[(_cdiv(vocab, HEAD_BLOCK_V),)](
            scores, codes, bias if bias is not None else out, out, tokens, vocab, codes.shape[1], out.stride(0),
            NUM_BOOKS=num_codebooks, CODEBOOK_SIZE=codebook_size, BITS=bits, BYTES=bytes_spanned(bits),
            PLANES=stored_as_planes(bits, vocab), HAS_BIAS=bias is not None, BLOCK_T=max(1, _next_power_of_2(tokens)), BLOCK_V=HEAD_BLOCK_V,
        )
    return out.reshape(*x.shape[:-1], vocab)
