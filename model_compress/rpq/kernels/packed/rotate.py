"""The input rotation x R (or a decoded row's y R^T) in one launch: signs and block Hadamard on tensor cores.

x R = (x * signs) @ B and y R^T = (y @ B) * signs, B = blockdiag(H_b) / sqrt(b) (``kernels/rotation.py``). A
program takes 16 or more rows of one block of b columns, multiplies by the +-1 Hadamard matrix (exact in every
dtype) and scales by 1/sqrt(b) in float32, rounding once. Rows past the input are masked (tensor cores need 16).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton.common import _cdiv, _rows

ROWS_PER_PROGRAM = 16


@triton.jit
def _rotate_kernel(
    x_ptr, signs_ptr, hadamard_ptr, out_ptr, rows, stride_x, stride_out, scale,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, SIGNS_FIRST: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_t < rows)[:, None]
    x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_c[None, :], mask=mask, other=0.0)
    signs = tl.load(signs_ptr + offs_c).to(x.dtype)
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


def _launch(x: Tensor, signs: Tensor, block: int, signs_first: bool) -> Tensor:
    width = x.shape[-1]
    rows = _rows(x, width)
    if rows.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        rows = rows.float()
    out = torch.empty_like(rows)
    if rows.shape[0]:
        _rotate_kernel[(_cdiv(rows.shape[0], ROWS_PER_PROGRAM), width // block)](
            rows, signs, _sign_matrix(block, x.device, rows.dtype), out, rows.shape[0], rows.stride(0), out.stride(0),
            block**-0.5, BLOCK=block, BLOCK_T=ROWS_PER_PROGRAM, SIGNS_FIRST=signs_first, DOT_IEEE=rows.dtype == torch.float32,
        )
    return out.reshape(x.shape)


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """x R along the last dimension; ``signs`` (width,) int8 +-1."""
    return _launch(x, signs, block, signs_first=True)


def unrotate(y: Tensor, signs: Tensor, block: int) -> Tensor:
    """y R^T along the last dimension (a decoded table row back to the model's basis)."""
    return _launch(y, signs, block, signs_first=False)
