"""Prompts (many fp16 or bf16 tokens) through 4- or 5-bit codes and one int8 table per output row, on tensor cores, without
writing W' anywhere: out^T = W' x^T with W' looked up in registers, in one launch.

Why a kernel of its own: the other prompt route decodes W' whole into a 16-bit temporary and calls cuBLAS: two
launches and a temporary of the layer's size, and at Llama-2-7B's shapes 4 bytes per weight written and read back
(0.59-0.65x the dense layer's speed at 512 tokens). The few-token kernel (``nibble_tables``) multiplies x by the
looked-up tile as its right operand, which on a Hopper GPU goes through shared memory first; on prompts it measured
1.3-3.7x slower than decode + cuBLAS. Here the looked-up tile is the *left* operand (rows of W' against columns of
x^T), the operand a warpgroup MMA reads from registers (Triton compiles it to ``wgmma``), and x^T is a plain load.
Each program owns BLOCK_N rows of W' and BLOCK_M tokens; the token tiles run fastest, so neighbouring programs share
the W' tile and the codes come from DRAM about once. The lookup is ``nibble_tables``' (byte permutes, exact v / 128),
the row's scale times 128 applied to the float32 sums.

What it measured (benchmarks/RESULTS.md, H100): 2.0-2.6x the dense layer's device time, against 1.3-1.8x for decode
+ cuBLAS, because a Triton GEMM at these tiles is itself 1.4-2.1x cuBLAS's time; but a launch fewer per layer, which
is what an eager prefill of a small model waits on (SmolLM2's shapes: 19 ms against 26 ms at 512 tokens). Where each
route is taken: ``config/packed_routes.py`` (``nibble_prompt_tile``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.packed_routes import PackedTile
from ..launch.direct_launch import DirectLaunch
from ..triton.common import _cdiv, _rows
from .linear import plan_input
from .nibble_tables import _code_rows, _row_tables, _values, nibble_decode_serves


@triton.jit
def _nibble_prompt_kernel(
    x_ptr,
    codes_ptr,
    codebooks_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    tokens,
    out_features,
    words_per_row,
    stride_x,
    stride_out,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One (BLOCK_N rows, BLOCK_M tokens) tile of out^T: grid axis 0 the token tiles, axis 1 the row tiles."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < tokens
    mask_n = offs_n < out_features
    rows = tl.where(mask_n, offs_n, 0)
    words_per_row = tl.multiple_of(words_per_row, 4)  # nibble_serves: in_features % 32 == 0
    t0, t1, t2, t3, t4, t5, t6, t7 = _row_tables(codebooks_ptr, rows, BITS)
    nibbles, tops = _code_rows(codes_ptr, rows, words_per_row, BITS)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, words_per_row, BLOCK_W):
        offs_w = step + tl.arange(0, BLOCK_W)
        mask_w = offs_w < words_per_row
        words = tl.load(nibbles + offs_w[None, :], mask=mask_n[:, None] & mask_w[None, :], other=0)
        top = tl.load(tops + offs_w[None, :], mask=mask_n[:, None] & mask_w[None, :], other=0).to(tl.int32) if BITS == 5 else words
        # (BLOCK_N, 8 BLOCK_W) values v / 128, exact in fp16 and in bf16 (8 significant bits at most)
        w = _values(words, top, t0, t1, t2, t3, t4, t5, t6, t7, BITS).to(x_ptr.dtype.element_ty)
        offs_k = step * 8 + tl.arange(0, BLOCK_W * 8)
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < words_per_row * 8)[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    acc = acc * (tl.load(scales_ptr + rows, mask=mask_n, other=0.0).to(tl.float32) * 128.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    targets = out_ptr + offs_m.to(tl.int64)[None, :] * stride_out + offs_n[:, None]
    tl.store(targets, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def nibble_prompt_serves(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, in_features: int) -> bool:
    """Whether ``nibble_prompt_plan`` computes this call: fp16 or bf16 tokens through ``nibble_decode_serves``'s formats."""
    return x.dtype in (torch.float16, torch.bfloat16) and nibble_decode_serves(codes, codebooks, scales, bits, in_features)


def nibble_prompt_plan(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, bits: int,
                       in_features: int, tile: PackedTile) -> Callable[[Tensor], Tensor]:
    """x W'^T + b (``nibble_prompt_serves``) for inputs shaped, strided and aligned like ``x``, on ``tile``
    (``block_m`` tokens, ``block_n`` rows, ``block_k`` codes a step; no split of the inputs)."""
    out_features = codebooks.shape[0]
    given = plan_input(x, in_features, out_features)
    if not given.tokens:
        return lambda x: given.output()
    grid = (_cdiv(given.tokens, tile.block_m), _cdiv(out_features, tile.block_n))
    launch = DirectLaunch(_nibble_prompt_kernel, grid, BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=tile.block_m,
                          BLOCK_N=tile.block_n, BLOCK_W=tile.block_k // 8, num_warps=tile.num_warps,
                          num_stages=tile.num_stages)
    words_per_row = in_features // 8

    def run(x: Tensor) -> Tensor:
        out = given.output()
        launch(x if given.as_rows else _rows(x, in_features), codes, codebooks, scales, out if bias is None else bias, out,
               given.tokens, out_features, words_per_row, given.stride, out_features)
        return out

    return run


def nibble_prompt_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, bits: int,
                         in_features: int, tile: PackedTile) -> Tensor:
    """x W'^T + b for a prompt's tokens on ``tile`` (``nibble_prompt_plan``, one call)."""
    return nibble_prompt_plan(x, codes, codebooks, scales, bias, bits, in_features, tile)(x)
