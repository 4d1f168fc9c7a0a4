"""The input rotation fused into the kernel that makes the input: a pre-norm (RMSNorm, LayerNorm) or a SiLU gate.

A rotated layer multiplies x R, so whatever writes x can write x R instead: one program per row computes the
norm's statistics (or silu(gate) * up), multiplies by the signs, and applies the block Hadamard on tensor cores to
the row seen as (blocks x b). Eager HF RMSNorm is seven launches and the rotation one more; this is one.
The row is rounded to the output dtype before the Hadamard product, as the unfused path rounds the norm's output.
The signs are int8 +-1 or the stored bits, as for ``rotate``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.norm_spec import LAYER_NORM, RMS_NORM
from ..triton.common import _next_power_of_2, _rows, _wait_for_inputs
from ..launch.direct_launch import DirectLaunch
from .rotate import _sign_matrix, load_signs, signs_are_packed

GATED_SILU = 3  # the prologue kind beside the norm kinds of config/norm_spec.py


@triton.jit
def _prologue_rotate_kernel(
    a_ptr, b_ptr, weight_ptr, bias_ptr, signs_ptr, hadamard_ptr, out_ptr, width, stride_a, stride_b, stride_out, eps, scale,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_W: tl.constexpr, DOT_IEEE: tl.constexpr,
    PACKED_SIGNS: tl.constexpr, PDL: tl.constexpr,
):
    # Everything is read after the wait: the signs, the Hadamard matrix and a norm's weight may have been made by the
    # kernel just before (signs unpacked on first use, a weight cast, Gemma's 1 + w); under PDL the launch overlaps.
    _wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_W)
    mask = offs < width
    signs = load_signs(signs_ptr, offs, mask, PACKED_SIGNS)
    inner = tl.arange(0, BLOCK)
    hadamard = tl.load(hadamard_ptr + inner[:, None] * BLOCK + inner[None, :])
    if KIND != 3:
        weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 3:  # silu(gate) * up
        up = tl.load(b_ptr + row * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
        value = a / (1.0 + tl.exp(-a)) * up
    else:
        if KIND == 2:  # RMSNorm
            value = a * tl.rsqrt(tl.sum(a * a, axis=0) / width + eps) * weight
        else:  # LayerNorm
            centred = tl.where(mask, a - tl.sum(a, axis=0) / width, 0.0)
            value = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / width + eps) * weight
            if HAS_BIAS:
                value += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    value = (value * signs).to(out_ptr.dtype.element_ty)
    blocks = tl.reshape(value, (BLOCK_W // BLOCK, BLOCK))
    if DOT_IEEE:
        rotated = tl.dot(blocks, hadamard, input_precision="ieee")
    else:
        rotated = tl.dot(blocks, hadamard)
    rotated = tl.reshape(rotated * scale, (BLOCK_W,))
    tl.store(out_ptr + row * stride_out + offs, rotated.to(out_ptr.dtype.element_ty), mask=mask)


def prologue_plan(a: Tensor, b: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, kind: int,
                  signs: Tensor, block: int, out_dtype: torch.dtype, pdl: bool = False) -> Callable[[Tensor, Tensor | None], Tensor]:
    """A call ``(a, b)`` for inputs shaped, strided and aligned like ``a`` and ``b`` (the SiLU prologue's up; None for a
    norm): grid, constants and the Hadamard matrix worked out once. ``pdl``: launched as a programmatic dependent
    (``triton.common.programmatic_launch_supported``): it starts while the kernel before ends."""
    width = a.shape[-1]
    rows_a = _rows(a, width)
    rows_b = _rows(b, width) if b is not None else rows_a
    count = rows_a.shape[0]
    shape, device = a.shape, a.device
    if not count:
        return lambda a, b: torch.empty(shape, device=device, dtype=out_dtype)
    a_as_rows = rows_a.data_ptr() == a.data_ptr()
    b_as_rows = b is None or rows_b.data_ptr() == b.data_ptr()
    stride_a, stride_b = rows_a.stride(0), rows_b.stride(0)
    block_w = max(_next_power_of_2(width), 16 * block)  # tensor cores take 16 or more blocks
    hadamard = _sign_matrix(block, device, out_dtype)
    launch = DirectLaunch(_prologue_rotate_kernel, (count,), KIND=kind, HAS_BIAS=bias is not None, BLOCK=block,
                          BLOCK_W=block_w, DOT_IEEE=out_dtype == torch.float32, PACKED_SIGNS=signs_are_packed(signs, width),
                          PDL=pdl, num_warps=4 if block_w <= 4096 else 8, launch_pdl=pdl)
    scale = block**-0.5

    def run(a: Tensor, b: Tensor | None) -> Tensor:
        rows_a = a if a_as_rows else _rows(a, width)
        rows_b = rows_a if b is None else (b if b_as_rows else _rows(b, width))
        out = torch.empty(shape, device=device, dtype=out_dtype)
        launch(rows_a, rows_b, weight if weight is not None else rows_a, bias if bias is not None else rows_a, signs, hadamard,
               out, width, stride_a, stride_b, width, eps, scale)
        return out

    return run


def norm_rotate_plan(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, kind: int, signs: Tensor, block: int,
                     pdl: bool = False) -> Callable[[Tensor, Tensor | None], Tensor]:
    """``norm_rotate`` as a call ``(x, None)`` for inputs like ``x``."""
    if kind not in (RMS_NORM, LAYER_NORM):
        raise ValueError(f"unknown norm kind {kind}")
    return prologue_plan(x, None, weight, bias, eps, kind, signs, block, weight.dtype, pdl)


def gated_silu_rotate_plan(gate: Tensor, up: Tensor, signs: Tensor, block: int,
                           pdl: bool = False) -> Callable[[Tensor, Tensor | None], Tensor]:
    """``gated_silu_rotate`` as a call ``(gate, up)`` for inputs like ``gate`` and ``up``."""
    return prologue_plan(gate, up, None, None, 0.0, GATED_SILU, signs, block, gate.dtype, pdl)


def norm_rotate(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, kind: int, signs: Tensor, block: int) -> Tensor:
    """norm(x) R in one launch (``kind``: RMS_NORM or LAYER_NORM of config/norm_spec.py), in the norm weight's dtype."""
    return norm_rotate_plan(x, weight, bias, eps, kind, signs, block)(x, None)


def gated_silu_rotate(gate: Tensor, up: Tensor, signs: Tensor, block: int) -> Tensor:
    """(silu(gate) * up) R in one launch, in gate's dtype."""
    return gated_silu_rotate_plan(gate, up, signs, block)(gate, up)
