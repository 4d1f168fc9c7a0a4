"""The input rotation of an RPQ layer (incoherence processing, as QuIP#, QuaRot and EXL3 do), in one place.

R = diag(signs) @ blockdiag(H_b, ..., H_b) / sqrt(b): random +-1 signs times a Walsh-Hadamard matrix of
order b repeated along the diagonal. R is orthogonal (R R^T = I), so a layer whose codes encode
W' = W R and that computes W' (R^T x) computes W x exactly; but no column of W' carries an outlier any
more (each is a signed mix of b columns of W), so a small table per row fits W' far better at the same bits.

Everything is written for row vectors (the last dimension), as a Linear sees its inputs:
  ``rotate``    x -> x R   = (x * signs) @ B      an input, the rows of a weight (W' = W R), a table's rows
  ``unrotate``  y -> y R^T = (y @ B) * signs      a table's decoded rows back to the original basis
  ``rotate_hessian``  H -> R^T H R                the input statistics of a rotated layer
with B the block-diagonal Hadamard matrix (symmetric). Each is one elementwise product and one batched
(b x b) matrix product, no Python loop over blocks. The signs are stored with the layer, one bit per input
feature (``pack_signs``: bit i of byte j set where feature 8j + i is negative), and the block size in its
config: both rebuild R bit for bit.
"""

from __future__ import annotations

import functools
import zlib

import torch
from torch import Tensor

HADAMARD = "hadamard"
NONE = "none"
ROTATIONS = (HADAMARD, NONE)
# Block sizes the budget may use; the default is the one that measured best (rpq/fit/defaults.py). A width
# that the wanted block does not divide takes the largest power of two that does; below MIN_BLOCK the
# rotation mixes too few columns to matter and the layer is left unrotated.
BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
MIN_BLOCK = 16


def block_for(width: int, wanted: int) -> int | None:
    """The rotation block of a ``width``-wide input: the largest power of two up to ``wanted`` that divides it, or None."""
    block = 1
    while block * 2 <= wanted and width % (block * 2) == 0:
        block *= 2
    return block if block >= MIN_BLOCK else None


def hadamard(block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (b, b) Walsh-Hadamard matrix divided by sqrt(b) (Sylvester's construction: b a power of two); made once per
    (block, device, dtype) and kept, except while ``torch.compile`` traces (the compiler folds the construction)."""
    if torch.compiler.is_compiling():
        return _sylvester(block, device, dtype)
    return _kept_hadamard(block, device, dtype)


@functools.lru_cache(maxsize=64)
def _kept_hadamard(block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _sylvester(block, device, dtype)


def _sylvester(block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if block < 1 or block & (block - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {block}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < block:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / block**0.5).to(device=device, dtype=dtype)


def random_signs(width: int, seed: int) -> Tensor:
    """(width,) int8 of +-1, the same for the same (width, seed) on every machine (torch's CPU generator)."""
    generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"rotation:{width}:{seed}".encode()))
    return (torch.randint(0, 2, (width,), generator=generator, dtype=torch.int8) * 2 - 1).to(torch.int8)


def pack_signs(signs: Tensor) -> Tensor:
    """(width,) +-1 -> (width / 8,) uint8, one bit per sign (set where negative); width a multiple of 8."""
    bits = (signs.reshape(-1, 8) < 0).to(torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=signs.device)
    return (bits * weights).sum(1).to(torch.uint8)


def unpack_signs(packed: Tensor) -> Tensor:
    """(width / 8,) uint8 -> (width,) int8 +-1: the inverse of ``pack_signs``."""
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    return (1 - 2 * bits).to(torch.int8).reshape(-1)


def packed_bytes(width: int) -> int:
    """What a layer's signs take in the checkpoint: one bit per input feature."""
    return width // 8


def _blocks(x: Tensor, block: int) -> Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """x R along the last dimension, in x's dtype."""
    product = _blocks(x * signs.to(x.dtype), block) @ hadamard(block, x.device, x.dtype)
    return product.reshape(x.shape)


def unrotate(y: Tensor, signs: Tensor, block: int) -> Tensor:
    """y R^T along the last dimension (the inverse of ``rotate``), in y's dtype."""
    product = (_blocks(y, block) @ hadamard(block, y.device, y.dtype)).reshape(y.shape)
    return product * signs.to(y.dtype)


def rotate_hessian(hessian: Tensor, signs: Tensor, block: int) -> Tensor:
    """R^T H R of a symmetric (n, n) second moment: the statistics of the rotated inputs x R."""
    return rotate(rotate(hessian, signs, block).T, signs, block).T.contiguous()


def dense_matrix(signs: Tensor, block: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """R itself, (n, n): for tests and inspection (the layers never build it)."""
    return rotate(torch.eye(signs.numel(), dtype=dtype), signs, block)
