"""Two or three byte-permute layers that read the same tokens (q/k/v, gate/up) in one launch, for 1 to 64 tokens.

At one token a 4096x4096 layer of 4-bit codes reads 8 MB in about 8 us, of which launching and draining the grid
is a good part; q, k and v in one grid of their rows together read like one 12288x4096 layer. Each program owns a
block of one member's rows (and, for several tokens, a block of tokens): the member is picked from the program's
index by two comparisons, its buffers by a branch, and its outputs land in one buffer that the members' outputs are
views of. One token takes the GEMV body (``nibble_tables._row_sums``), more the tensor-core one (``_tile_sums``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config.packed_routes import PackedTile, rotates_in_load
from ..triton.common import _cdiv, _rows, _store_tile, split_scratch, tile_counters
from ..launch.direct_launch import DirectLaunch
from .linear import input_split
from .nibble_tables import _in_load_rotation, _row_sums, _tile_sums


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
def _nibble_group_gemv_kernel(
    x_ptr,
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
    words_per_row,
    split_k,
    chunk_words,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT: tl.constexpr,
    X_FP16: tl.constexpr,
    PDL: tl.constexpr,
    ROTATE: tl.constexpr,
    PACKED_SIGNS: tl.constexpr,
):
    codes_ptr, codebooks_ptr, scales_ptr, local, count, first = _member(
        tl.program_id(0), codes_a, codebooks_a, scales_a, codes_b, codebooks_b, scales_b, codes_c, codebooks_c, scales_c, rows_a,
        rows_b, rows_c, tiles_a, tiles_ab)
    offs_local = local * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_local < count
    sums = _row_sums(x_ptr, x_ptr, codes_ptr, codebooks_ptr, scales_ptr, signs_ptr, hadamard_ptr, rotation_scale, offs_local,
                     mask_n, words_per_row, chunk_words, BITS, BLOCK_N, BLOCK_W, X_FP16, PDL, ROTATE, PACKED_SIGNS, False)
    total = rows_a + rows_b + rows_c
    one = tl.arange(0, 1)
    _store_tile(sums[None, :], partial_ptr, counter_ptr, bias_ptr, out_ptr, one, first + offs_local, one < 1, mask_n, 1, total,
                total, split_k, HAS_BIAS, SPLIT, 1, BLOCK_N)


@triton.jit
def _nibble_group_linear_kernel(
    x_ptr,
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
    PDL: tl.constexpr,
    ROTATE: tl.constexpr,
    PACKED_SIGNS: tl.constexpr,
):
    """2 to 64 tokens through the members (grid axis 1: token tiles), on tensor cores as ``_nibble_linear_kernel``."""
    codes_ptr, codebooks_ptr, scales_ptr, local, count, first = _member(
        tl.program_id(0), codes_a, codebooks_a, scales_a, codes_b, codebooks_b, scales_b, codes_c, codebooks_c, scales_c, rows_a,
        rows_b, rows_c, tiles_a, tiles_ab)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < tokens
    offs_local = local * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_local < count
    acc = _tile_sums(x_ptr, x_ptr, codes_ptr, codebooks_ptr, scales_ptr, signs_ptr, hadamard_ptr, rotation_scale, offs_m, mask_m,
                     offs_local, mask_n, words_per_row, stride_x, chunk_words, BITS, BLOCK_M, BLOCK_N, BLOCK_W, PDL, ROTATE,
                     PACKED_SIGNS, False)
    total = rows_a + rows_b + rows_c
    _store_tile(acc, partial_ptr, counter_ptr, bias_ptr, out_ptr, offs_m, first + offs_local, mask_m, mask_n, tokens, total,
                total, split_k, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N)


def nibble_group_plan(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor]], bias: Tensor | None, bits: int,
                      in_features: int, tile: PackedTile, multiprocessors: int, pdl: bool = False,
                      rotation: tuple[Tensor, int] | None = None) -> Callable[[Tensor], Tensor]:
    """The members times tokens shaped like ``x`` in one launch, as a call: the grid, split and buffers worked out once.
    One token on the GEMV (``tile.block_m`` 1), more on tensor cores. The call returns the members' outputs side by
    side in one tensor (the last dimension their widths in order). ``pdl`` and ``rotation`` (x before the members'
    common rotation): as ``nibble_linear_plan``."""
    if not 2 <= len(members) <= 3:
        raise ValueError(f"a group has 2 or 3 members, got {len(members)}")
    counts = [codebooks.shape[0] for _, codebooks, _ in members]
    padded = list(members) + [members[-1]] * (3 - len(members))  # a pair's third member owns no tile
    rows = counts + [0] * (3 - len(counts))
    tiles = [_cdiv(count, tile.block_n) for count in rows]
    total = sum(counts)
    out_shape = (*x.shape[:-1], total)
    device, dtype = x.device, x.dtype
    tokens = x.numel() // in_features
    tiles_m = _cdiv(tokens, tile.block_m)
    split, chunk = input_split(in_features, sum(tiles) * tiles_m, tile, multiprocessors)
    counter = tile_counters(sum(tiles) * tiles_m, device) if split > 1 else None
    constants = dict(BITS=bits, HAS_BIAS=bias is not None, BLOCK_N=tile.block_n, BLOCK_W=tile.block_k // 8, SPLIT=split > 1,
                     PDL=pdl, num_warps=tile.num_warps, num_stages=tile.num_stages, launch_pdl=pdl)
    buffers = [t for member in padded for t in member]
    member_rows = (*rows, tiles[0], tiles[0] + tiles[1])
    if rotation is not None and not rotates_in_load(rotation[1], tile):
        raise ValueError(f"a {tile.describe()} launch cannot rotate in blocks of {rotation[1]} as it loads x")
    signs, hadamard, rotation_scale, in_load = _in_load_rotation(rotation, in_features, device, dtype, x)
    if tokens == 1 and tile.block_m == 1:
        launch = DirectLaunch(_nibble_group_gemv_kernel, (sum(tiles), 1, split), X_FP16=x.dtype == torch.float16, **in_load,
                              **constants)

        def run(x: Tensor) -> Tensor:
            out = torch.empty(out_shape, device=device, dtype=dtype)
            partial, counters = split_scratch(out, split, counter)
            launch(x, *buffers, out if bias is None else bias, out, partial, counters, signs, hadamard, rotation_scale,
                   *member_rows, in_features // 8, split, chunk // 8)
            return out

        return run
    given = _rows(x, in_features)
    as_rows, stride_x = given.data_ptr() == x.data_ptr(), given.stride(0)
    launch = DirectLaunch(_nibble_group_linear_kernel, (sum(tiles), tiles_m, split), BLOCK_M=tile.block_m, **in_load,
                          **constants)

    def run_tokens(x: Tensor) -> Tensor:
        out = torch.empty(out_shape, device=device, dtype=dtype)
        partial, counters = split_scratch(out, split, counter)
        launch(x if as_rows else _rows(x, in_features), *buffers, out if bias is None else bias, out, partial, counters, signs,
               hadamard, rotation_scale, *member_rows, tokens, in_features // 8, stride_x, split, chunk // 8)
        return out

    return run_tokens


def nibble_group_gemv(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor]], bias: Tensor | None, bits: int,
                      in_features: int, tile: PackedTile, multiprocessors: int, pdl: bool = False,
                      rotation: tuple[Tensor, int] | None = None) -> list[Tensor]:
    """Each member's (codes, codebooks, scales) times fp16 or bf16 tokens x, all in one launch (``nibble_serves`` for each);
    ``bias``: the members' biases end to end, or None. Returns views of one output buffer, in the members' order."""
    out = nibble_group_plan(x, members, bias, bits, in_features, tile, multiprocessors, pdl, rotation)(x)
    return list(out.split([codebooks.shape[0] for _, codebooks, _ in members], dim=-1))
