"""The input rotation x R (or a decoded row's y R^T) in one launch: signs and block Hadamard on tensor cores.

The signs come as +-1 values (int8 or the token's dtype) or as the layer stores them, one bit a feature (``load_signs``):
a compiled model hands the stored bits over as they are, so its graph unpacks nothing on every step.

x R = (x * signs) @ B and y R^T = (y @ B) * signs, B = blockdiag(H_b) / sqrt(b) (``kernels/rotation.py``). A
program takes 16 or more rows of one block of b columns, multiplies by the +-1 Hadamard matrix (exact in every
dtype) and scales by 1/sqrt(b) in float32, rounding once. Rows past the input are masked (tensor cores need 16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton.common import _cdiv, _rows, _wait_for_inputs
from ..launch.direct_launch import DirectLaunch

ROWS_PER_PROGRAM = 16


@triton.jit
def load_signs(signs_ptr, offs, mask, PACKED: tl.constexpr):
    """Signs of features ``offs`` as float32 +-1: from +-1 values, or (``PACKED``) from bit ``offs % 8`` of byte
    ``offs // 8``, set where negative (``kernels/rotation.pack_signs``)."""
    if PACKED:
        bits = (tl.load(signs_ptr + offs // 8, mask=mask, other=0).to(tl.int32) >> (offs % 8)) & 1
        return (1 - 2 * bits).to(tl.float32)
    return tl.load(signs_ptr + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def rotated_rows(x_ptr, up_ptr, signs_ptr, hadamard_ptr, offs_m, mask_m, stride_x, offs_k, mask_k, scale, BLOCK: tl.constexpr,
                 ROWS: tl.constexpr, WIDTH: tl.constexpr, PACKED_SIGNS: tl.constexpr, GATED: tl.constexpr):
    """x R over inputs ``offs_k`` (WIDTH of them, whole blocks of BLOCK) of token rows ``offs_m`` (ROWS, at a stride of
    ``stride_x``), in x's dtype, for a kernel that rotates its input as it loads it; ROWS * WIDTH / BLOCK must be 16 or
    more (tensor cores). The same arithmetic as ``_rotate_kernel``, so the same values it would write. ``GATED``: x is
    a SiLU gate and ``up_ptr`` its up projection (the same stride), and the rows are (silu(gate) * up) R, as the SiLU
    prologue (``prologue.py``) computes them."""
    offsets = offs_m[:, None] * stride_x + offs_k[None, :]
    mask = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    signs = load_signs(signs_ptr, offs_k, mask_k, PACKED_SIGNS)
    if GATED:
        a = x.to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        value = (a / (1.0 + tl.exp(-a)) * up * signs[None, :]).to(x.dtype)
    else:
        value = x * signs.to(x.dtype)[None, :]
    inner = tl.arange(0, BLOCK)
    hadamard = tl.load(hadamard_ptr + inner[:, None] * BLOCK + inner[None, :])
    rotated = tl.dot(tl.reshape(value, (ROWS * WIDTH // BLOCK, BLOCK)), hadamard) * scale
    return tl.reshape(rotated, (ROWS, WIDTH)).to(x.dtype)


def signs_are_packed(signs: Tensor, width: int) -> bool:
    """Whether ``signs`` are the stored bits (uint8, width / 8) rather than +-1 values (width, int8 or a float dtype);
    anything else is refused."""
    if signs.dtype == torch.uint8 and signs.numel() * 8 == width:
        return True
    if signs.dtype != torch.uint8 and signs.numel() == width:
        return False
    raise ValueError(f"signs for {width} features are +-1 values ({width},) or uint8 bits ({width // 8},), got {signs.dtype} "
                     f"{tuple(signs.shape)}")


@triton.jit
def _rotate_kernel(
    x_ptr, signs_ptr, hadamard_ptr, out_ptr, rows, stride_x, stride_out, scale,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, SIGNS_FIRST: tl.constexpr, DOT_IEEE: tl.constexpr,
    PACKED_SIGNS: tl.constexpr, PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)  # before every read: the signs and the Hadamard matrix may come from the kernel just before
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_t < rows)[:, None]
    x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_c[None, :], mask=mask, other=0.0)
    signs = load_signs(signs_ptr, offs_c, offs_c >= 0, PACKED_SIGNS).to(x.dtype)
    inner = tl.arange(0, BLOCK)
    hadamard = tl.load(hadamard_ptr + inner[:, None] * BLOCK + inner[None, :])
    if SIGNS_FIRST:
        x = x * signs[None, :]
    if DOT_IEEE:
        y = tl.dot(x, hadamard, input_precision="ieee")
    else:
        y = tl.dot(x, hadamard)
    y = y * scale
    if not SIGNS_FIRST:
        y = y * signs.to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_out + offs_c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=32)
def _sign_matrix(block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The +-1 Walsh-Hadamard matrix of order ``block`` (exact in any dtype). Built here, not taken from
    ``kernels/rotation.py``: the kernel packages import nothing from their parent package's modules (no cycle)."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < block:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix.to(device=device, dtype=dtype).contiguous()


def rotate_plan(x: Tensor, signs: Tensor, block: int, signs_first: bool = True, pdl: bool = False) -> Callable[[Tensor], Tensor]:
    """x R (``signs_first``) or y R^T as a call for inputs shaped, strided and typed like ``x``: grid and constants
    worked out once. ``signs``: int8 +-1 or the stored bits (``signs_are_packed``). ``pdl``: launched as a
    programmatic dependent (``triton.common.programmatic_launch_supported``): it starts while the kernel before ends."""
    width = x.shape[-1]
    packed = signs_are_packed(signs, width)
    rows = _rows(x, width)
    cast = rows.dtype not in (torch.float16, torch.bfloat16, torch.float32)
    dtype = torch.float32 if cast else rows.dtype
    count = rows.shape[0]
    if not count:
        return lambda x: torch.empty(x.shape, device=x.device, dtype=dtype)
    as_rows = rows.data_ptr() == x.data_ptr() and not cast
    stride_x = rows.stride(0) if not cast else width
    shape, device = x.shape, x.device
    hadamard, scale = _sign_matrix(block, device, dtype), block**-0.5
    launch = DirectLaunch(_rotate_kernel, (_cdiv(count, ROWS_PER_PROGRAM), width // block), BLOCK=block,
                          BLOCK_T=ROWS_PER_PROGRAM, SIGNS_FIRST=signs_first, DOT_IEEE=dtype == torch.float32,
                          PACKED_SIGNS=packed, PDL=pdl, launch_pdl=pdl)

    def run(x: Tensor) -> Tensor:
        if as_rows:
            source = x
        else:
            source = _rows(x, width)
            source = source.float() if cast else source
        out = torch.empty(shape, device=device, dtype=dtype)
        launch(source, signs, hadamard, out, count, stride_x, width, scale)
        return out

    return run


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """x R along the last dimension; ``signs`` (width,) int8 +-1 or (width / 8,) uint8 bits."""
    return rotate_plan(x, signs, block, signs_first=True)(x)


def unrotate(y: Tensor, signs: Tensor, block: int) -> Tensor:
    """y R^T along the last dimension (a decoded table row back to the model's basis)."""
    return rotate_plan(y, signs, block, signs_first=False)(y)
