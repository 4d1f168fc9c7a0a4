"""The byte-permute product launch: one layer, or two or three siblings that read the same tokens (q/k/v, gate/up), for
1 to 64 tokens, in one kernel.

At one token a 4096x4096 layer of 4-bit codes reads 8 MB in about 8 us, of which launching and draining the grid
is a good part; q, k and v in one grid of their rows together read like one 12288x4096 layer. Each program owns a
block of one member's rows (and, for several tokens, a block of tokens): the member is picked from the program's
index by two comparisons, its buffers by a branch, and its outputs land in one buffer that the members' outputs are
views of. A single layer is a group of one. One token takes the GEMV body (``nibble_tables._row_sums``), more the
tensor-core one (``_tile_sums``); either may rotate x as it loads it and, for a SiLU-gated MLP's down_proj, form
(silu(gate) * up) R there (``rotate.rotated_rows``), so neither needs a launch of its own before the product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.packed_routes import PackedTile, rotates_in_load
from ..launch.direct_launch import DirectLaunch
from ..triton.common import _cdiv, _rows, _store_tile, split_scratch, tile_counters
from .linear import input_split, plan_input
from .nibble_tables import _row_sums, _tile_sums
from .rotate import _sign_matrix, signs_are_packed


@triton.jit
def _member(tile, codes_a, codebooks_a, scales_a, codes_b, codebooks_b, scales_b, codes_c, codebooks_c, scales_c, rows_a,
            rows_b, rows_c, tiles_a, tiles_ab):
    """The member that owns row tile ``tile`` (grid axis 0): its buffers, the tile's index among its own, its row count
    and its first column in the joined output."""
    if tile < tiles_a:
        codes_ptr, codebooks_ptr, scales_ptr, local, count, first = codes_a, codebooks_a, scales_a, tile, rows_a, 0
    elif tile < tiles_ab:
        codes_ptr, codebooks_ptr, scales_ptr, local, count, first = codes_b, codebooks_b, scales_b, tile - tiles_a, rows_b, rows_a
    else:
        codes_ptr, codebooks_ptr, scales_ptr = codes_c, codebooks_c, scales_c
        local, count, first = tile - tiles_ab, rows_c, rows_a + rows_b
    return codes_ptr, codebooks_ptr, scales_ptr, local, count, first


@triton.jit
def _nibble_product_kernel(
    x_ptr,
    up_ptr,
    codes_a,
    codebooks_a,
    scales_a,
    codes_b,
    codebooks_b,
    scales_b,
    codes_c,
    codebooks_c,
    scales_c,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    signs_ptr,
    hadamard_ptr,
    rotation_scale,
    rows_a,
    rows_b,
    rows_c,
    tiles_a,
    tiles_ab,
    tokens,
    words_per_row,
    stride_x,
    split_k,
    chunk_words,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT: tl.constexpr,
    X_FP16: tl.constexpr,
    PDL: tl.constexpr,
    ROTATE: tl.constexpr,
    PACKED_SIGNS: tl.constexpr,
    GATED: tl.constexpr,
):
    """Grid (the members' row tiles, token tiles, split): one token (BLOCK_M 1) as a GEMV, 2 to 64 on tensor cores."""
    codes_ptr, codebooks_ptr, scales_ptr, local, count, first = _member(
        tl.program_id(0), codes_a, codebooks_a, scales_a, codes_b, codebooks_b, scales_b, codes_c, codebooks_c, scales_c, rows_a,
        rows_b, rows_c, tiles_a, tiles_ab)
    offs_local = local * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_local < count
    total = rows_a + rows_b + rows_c
    if BLOCK_M == 1:
        sums = _row_sums(x_ptr, up_ptr, codes_ptr, codebooks_ptr, scales_ptr, signs_ptr, hadamard_ptr, rotation_scale, offs_local,
                         mask_n, words_per_row, chunk_words, BITS, BLOCK_N, BLOCK_W, X_FP16, PDL, ROTATE, PACKED_SIGNS, GATED)
        one = tl.arange(0, 1)
        _store_tile(sums[None, :], partial_ptr, counter_ptr, bias_ptr, out_ptr, one, first + offs_local, one < 1, mask_n, 1,
                    total, total, split_k, HAS_BIAS, SPLIT, 1, BLOCK_N)
    else:
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < tokens
        acc = _tile_sums(x_ptr, up_ptr, codes_ptr, codebooks_ptr, scales_ptr, signs_ptr, hadamard_ptr, rotation_scale, offs_m,
                         mask_m, offs_local, mask_n, words_per_row, stride_x, chunk_words, BITS, BLOCK_M, BLOCK_N, BLOCK_W, PDL,
                         ROTATE, PACKED_SIGNS, GATED)
        _store_tile(acc, partial_ptr, counter_ptr, bias_ptr, out_ptr, offs_m, first + offs_local, mask_m, mask_n, tokens, total,
                    total, split_k, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N)


def _in_load_rotation(rotation: tuple[Tensor, int] | None, width: int, device: torch.device, dtype: torch.dtype,
                      stand_in: Tensor) -> tuple[Tensor, Tensor, float, dict]:
    """The signs, Hadamard matrix and scale a launch passes, and its ROTATE / PACKED_SIGNS constants; with no rotation,
    ``stand_in`` for the unread pointers."""
    if rotation is None:
        return stand_in, stand_in, 1.0, dict(ROTATE=0, PACKED_SIGNS=False)
    signs, block = rotation
    return (signs, _sign_matrix(block, device, dtype), block**-0.5,
            dict(ROTATE=block, PACKED_SIGNS=signs_are_packed(signs, width)))


def _product_plan(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor]], bias: Tensor | None, bits: int, in_features: int,
                  tile: PackedTile, multiprocessors: int, pdl: bool, rotation: tuple[Tensor, int] | None,
                  gated: bool) -> Callable[..., Tensor]:
    """The members (1 to 3) times tokens shaped, strided, typed and aligned like ``x``, their outputs side by side in
    one tensor, as a call ``(x)`` (``(gate, up)`` where ``gated``): shapes, split, grid and buffers worked out once."""
    if rotation is not None and not rotates_in_load(rotation[1], tile):
        raise ValueError(f"a {tile.describe()} launch cannot rotate in blocks of {rotation[1]} as it loads x")
    if gated and rotation is None:
        raise ValueError("the SiLU gate is formed in the load of a rotated layer only")
    counts = [codebooks.shape[0] for _, codebooks, _ in members]
    given = plan_input(x, in_features, sum(counts))
    if not given.tokens:
        return lambda x, up=None: given.output()
    padded = list(members) + [members[-1]] * (3 - len(members))  # members past the last own no tile
    rows = counts + [0] * (3 - len(counts))
    tiles = [_cdiv(count, tile.block_n) for count in rows]
    tiles_m = 1 if tile.block_m == 1 else _cdiv(given.tokens, tile.block_m)
    if tile.block_m == 1 and given.tokens != 1:
        raise ValueError(f"a one-token tile ({tile.describe()}) for {given.tokens} tokens")
    split, chunk = input_split(in_features, sum(tiles) * tiles_m, tile, multiprocessors)
    counter = tile_counters(sum(tiles) * tiles_m, given.device) if split > 1 else None
    signs, hadamard, rotation_scale, in_load = _in_load_rotation(rotation, in_features, given.device, given.dtype, x)
    launch = DirectLaunch(_nibble_product_kernel, (sum(tiles), tiles_m, split), BITS=bits, HAS_BIAS=bias is not None,
                          BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_W=tile.block_k // 8, SPLIT=split > 1,
                          X_FP16=given.dtype == torch.float16, PDL=pdl, GATED=gated, **in_load, num_warps=tile.num_warps,
                          num_stages=tile.num_stages, launch_pdl=pdl)
    buffers = [t for member in padded for t in member]
    shape = (*rows, tiles[0], tiles[0] + tiles[1], given.tokens, in_features // 8, given.stride, split, chunk // 8)
    as_rows = given.as_rows

    def run(x: Tensor, up: Tensor | None = None) -> Tensor:
        out = given.output()
        partial, counters = split_scratch(out, split, counter)
        rows_x = x if as_rows else _rows(x, in_features)
        launch(rows_x, rows_x if up is None else up, *buffers, out if bias is None else bias, out, partial, counters, signs,
               hadamard, rotation_scale, *shape)
        return out

    return run


def nibble_linear_plan(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, bits: int,
                       in_features: int, tile: PackedTile, multiprocessors: int, pdl: bool = False,
                       rotation: tuple[Tensor, int] | None = None, gated: bool = False) -> Callable[..., Tensor]:
    """x W'^T + b (``nibble_serves``) as a call for inputs shaped, strided, typed and aligned like ``x``: one token on
    the GEMV, more on tensor cores; ``tile.block_k`` counts codes. Shapes, split and grid are worked out here, once.
    ``pdl``: launched as a programmatic dependent (``programmatic_launch_supported``), its weights read early.
    ``rotation``: (signs, block) where x is the input before the layer's rotation, which the kernel then applies as it
    loads x (``rotates_in_load`` must hold; the signs as ``rotate`` takes them). ``gated`` (with a rotation): the call
    takes ``(gate, up)`` of a SiLU-gated MLP, shaped, strided and aligned like ``x`` (up at gate's row stride), and
    multiplies (silu(gate) * up) R."""
    return _product_plan(x, [(codes, codebooks, scales)], bias, bits, in_features, tile, multiprocessors, pdl, rotation, gated)


def nibble_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None, bits: int,
                  in_features: int, tile: PackedTile, multiprocessors: int, pdl: bool = False,
                  rotation: tuple[Tensor, int] | None = None) -> Tensor:
    """x W'^T + b (``nibble_serves``): one token on the GEMV, more on tensor cores; ``tile.block_k`` counts codes.
    ``rotation``: as ``nibble_linear_plan``."""
    return nibble_linear_plan(x, codes, codebooks, scales, bias, bits, in_features, tile, multiprocessors, pdl, rotation)(x)


def nibble_group_plan(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor]], bias: Tensor | None, bits: int,
                      in_features: int, tile: PackedTile, multiprocessors: int, pdl: bool = False,
                      rotation: tuple[Tensor, int] | None = None) -> Callable[[Tensor], Tensor]:
    """The members times tokens shaped like ``x`` in one launch, as a call: the grid, split and buffers worked out once.
    The call returns the members' outputs side by side in one tensor (the last dimension their widths in order).
    ``bias``: the members' biases end to end, or None; ``pdl`` and ``rotation`` (x before the members' common
    rotation): as ``nibble_linear_plan``."""
    if not 2 <= len(members) <= 3:
        raise ValueError(f"a group has 2 or 3 members, got {len(members)}")
    return _product_plan(x, members, bias, bits, in_features, tile, multiprocessors, pdl, rotation, False)


def nibble_group_gemv(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor]], bias: Tensor | None, bits: int,
                      in_features: int, tile: PackedTile, multiprocessors: int, pdl: bool = False,
                      rotation: tuple[Tensor, int] | None = None) -> list[Tensor]:
    """Each member's (codes, codebooks, scales) times fp16 or bf16 tokens x, all in one launch (``nibble_serves`` for each);
    ``bias``: the members' biases end to end, or None. Returns views of one output buffer, in the members' order."""
    out = nibble_group_plan(x, members, bias, bits, in_features, tile, multiprocessors, pdl, rotation)(x)
    return list(out.split([codebooks.shape[0] for _, codebooks, _ in members], dim=-1))
