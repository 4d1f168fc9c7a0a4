"""What the RPQ Triton kernels share: L2 prefetch, size helpers, the device check, split-K arrival counters and the
tile accumulate / store steps."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _prefetch_l2(pointers, mask):
    """``prefetch.global.L2`` of the cache lines at ``pointers`` (where ``mask``): no registers, no wait."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r",
        [pointers, mask.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _prefetch_codebook_slice(slice_base, CODEBOOK_SIZE: tl.constexpr, PIECE: tl.constexpr, BLOCK_N: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetch of BLOCK_N columns of every row of one codebook (LINE elements per 128-byte line)."""
    lines = tl.arange(0, CODEBOOK_SIZE)[:, None] * PIECE + tl.arange(0, (BLOCK_N + LINE - 1) // LINE)[None, :] * LINE
    _prefetch_l2(slice_base + lines, lines >= 0)


def _rows(x: Tensor, width: int) -> Tensor:
    """x as a (tokens, width) matrix with unit stride along the row (a copy only if it has to be)."""
    rows = x.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. ``triton.cdiv`` is a constexpr function in Triton 3.6: about 10 us per host call."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (host side; ``triton.next_power_of_2`` costs as much as ``triton.cdiv``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the CPU interpreter runs no inline PTX


@functools.cache
def programmatic_launch_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` may be launched as programmatic dependents (``griddepcontrol``): compute capability
    9.0 on, compiled, not interpreted."""
    return not INTERPRETED and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _wait_for_inputs(PDL: tl.constexpr):
    """Programmatic dependent launch: wait until the kernel before has finished and its writes are visible, then let
    the next kernel start (its programs read their weights while this one computes, and wait here in turn).

    A kernel launched with ``launch_pdl`` calls this in every program before it reads an activation or writes
    anything (the allocator may hand it memory the kernel before still reads). Only a layer's own weights (codes,
    tables, scales, which no inference kernel writes) may be read before it. Releasing only after the wait keeps
    that safe: when a kernel starts, every kernel before the one just ahead of it has finished."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


_COUNTERS: dict[torch.device, list[Tensor]] = {}  # per device: every counter buffer made, the largest last


def clear_workspaces() -> None:
    """Forget the kept split-K counters (between models measured one after the other)."""
    _COUNTERS.clear()


def kept_bytes() -> int:
    """Device bytes these kernels keep between calls (the split-K counters): what a model's memory has beyond its own."""
    return sum(t.numel() * t.element_size() for kept in _COUNTERS.values() for t in kept)


def tile_counters(count: int, device: torch.device) -> Tensor:
    """Split-K arrival counters, zero at rest: the kernel puts each back to 0 when its tile is done.

    Sized to the largest call so far (a power of two, at least 128: one 512-byte allocator block).
    A smaller buffer made before is kept, not freed: a CUDA graph captured with it still writes there.
    """
    kept = _COUNTERS.setdefault(torch.device(device), [])
    if not kept or kept[-1].numel() < count:
        kept.append(torch.zeros(max(128, _next_power_of_2(count)), device=device, dtype=torch.int32))
    return kept[-1]


def split_buffers(out: Tensor, split: int, tiles: int) -> tuple[Tensor, Tensor]:
    """The float32 partial sums and arrival counters of a split-K launch over ``tiles`` output tiles into ``out``; with
    no split the kernel never touches them, and ``out`` stands in for both."""
    return split_scratch(out, split, tile_counters(tiles, out.device) if split > 1 else None)


def split_scratch(out: Tensor, split: int, counter: Tensor | None) -> tuple[Tensor, Tensor]:
    """``split_buffers`` with the counters already found (a kept launch plan holds them): a new partial-sum buffer
    for this call where ``counter`` is given, else ``out`` for both."""
    if counter is None:
        return out, out
    return torch.empty(split * out.numel(), device=out.device, dtype=torch.float32), counter


@triton.jit
def _tile_rows(tokens, out_features, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's token rows (grid axis 1) and output rows (axis 0), with their masks."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < tokens, offs_n < out_features


@triton.jit
def _accumulate(acc, x, w, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr):
    """acc + x @ w: tensor cores from 16 rows on (IEEE float32 for float32 weights), else a broadcast multiply-sum."""
    if USE_DOT and DOT_IEEE:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    elif USE_DOT:
        acc = tl.dot(x, w, acc)
    else:
        acc += tl.sum(x[:, :, None].to(tl.float32) * w[None, :, :].to(tl.float32), axis=1)
    return acc


@triton.jit
def _store_tile(acc, partial_ptr, counter_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, tokens, out_features,
                stride_out, split_k, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a finished tile, or (split-K) leave a partial sum and let the tile's last program add them up.

    The last program is found with an atomic counter that also orders the partial writes; it puts
    the counter back to 0, so the counters need no reset between calls (or graph replays).
    """
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tile_offs = offs_m[:, None] * out_features + offs_n[None, :]
        tl.store(partial_ptr + tl.program_id(2) * tokens * out_features + tile_offs, acc, mask=mask_mn)
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == split_k - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for part in range(0, split_k):
                acc += tl.load(partial_ptr + part * tokens * out_features + tile_offs, mask=mask_mn, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + tile, 0)
            _finish_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_n, mask_mn, stride_out, HAS_BIAS)
    else:
        _finish_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_n, mask_mn, stride_out, HAS_BIAS)


@triton.jit
def _finish_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_n, mask_mn, stride_out, HAS_BIAS: tl.constexpr):
    """Add the bias and store the tile in the output dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_mn)
