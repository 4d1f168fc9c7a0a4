"""The binned kernel (one token, and q/k/v groups of up to three layers in one launch): x summed over each group of
equal codes (``layout.code_bins``), times the group's codebook row; a deferred LayerNorm / RMSNorm applied inside."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..config.norm_spec import NormSpec
from ..config.routes import BINNED, TileConfig
from .common import INTERPRETED, _cdiv, programmatic_launch_supported, _next_power_of_2, _prefetch_codebook_slice, _prefetch_l2, _rows


@triton.jit
def _rpq_binned_kernel(
    x_ptr,
    slots_ptr,
    row_codes_ptr,
    codebooks_ptr,
    bias_ptr,
    out_ptr,
    tokens,
    rows,
    stride_x,
    stride_out,
    slots1_ptr,
    row_codes1_ptr,
    codebooks1_ptr,
    bias1_ptr,
    rows1,
    slots2_ptr,
    row_codes2_ptr,
    codebooks2_ptr,
    bias2_ptr,
    rows2,
    gamma_ptr,
    eps,
    in_features,
    up_ptr,
    CODEBOOK_SIZE: tl.constexpr,
    PIECE: tl.constexpr,
    NUM_CODEBOOKS: tl.constexpr,
    MEMBERS: tl.constexpr,
    NORM: tl.constexpr,
    GATED: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr,
    SLOT_LINES: tl.constexpr,
    LINE: tl.constexpr,
    PDL: tl.constexpr,
    PRELOAD: tl.constexpr,
    LOCAL_X: tl.constexpr,
    IN_BLOCK: tl.constexpr,
):
    """Few tokens: piece h of y is sum over rows r of (x summed over row r's inputs) * codebooks[h, code of r].

    ``layout.code_bins`` groups each codebook's inputs by code into rows of WIDTH slots, so the
    kernel gathers x once per input and one codebook row per row: D times less work than gathering
    a codebook row per input, and every codebook row read once. A program owns its outputs: no
    split-K hand-over. Programs of one codebook (one per BLOCK_N outputs) each redo the row sums,
    which are cheap. With PRELOAD (one row block covers all rows) the weights are loaded before the
    PDL wait for x: the chain slots/row codes -> codebook rows then overlaps the previous kernel.

    MEMBERS (up to 3) layers of one shape that read the same x (q/k/v) run as one launch, member m
    with its own ``*<m>_ptr`` tensors and row count, its outputs in columns m*out.. of ``out``.

    NORM (1 LayerNorm, 2 RMSNorm): x is the norm's input, not its output (``fused_norm``). Each
    program takes x's statistics itself (a few KB from L2) and gathers the norm weight beside x, so
    a row's sum becomes rstd * (sum of gamma*x - mean * sum of gamma); the norm's bias is already in
    ``bias`` (W beta, added at load). The gamma gather needs only the slots: it is a weight load.

    GATED: the layer's input is silu(x) * up (a SiLU-gated MLP's down projection, ``fused_glu``):
    ``up`` is gathered at the same slots, with x's row stride, and the product never exists.
    """
    tiles: tl.constexpr = (PIECE + BLOCK_N - 1) // BLOCK_N
    member_programs: tl.constexpr = NUM_CODEBOOKS * tiles
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    member = pid_n // member_programs
    local = pid_n - member * member_programs
    if MEMBERS > 1:
        first, second = member == 1, member == 2
        slots_ptr = tl.where(first, slots1_ptr, tl.where(second, slots2_ptr, slots_ptr))
        row_codes_ptr = tl.where(first, row_codes1_ptr, tl.where(second, row_codes2_ptr, row_codes_ptr))
        codebooks_ptr = tl.where(first, codebooks1_ptr, tl.where(second, codebooks2_ptr, codebooks_ptr))
        bias_ptr = tl.where(first, bias1_ptr, tl.where(second, bias2_ptr, bias_ptr))
        rows = tl.where(first, rows1, tl.where(second, rows2, rows))
    head = local // tiles
    offs_d = (local - head * tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = offs_d < PIECE
    slot_base = slots_ptr + head * rows * WIDTH
    code_base = row_codes_ptr + head * rows
    slice_base = codebooks_ptr + head * CODEBOOK_SIZE * PIECE + (local - head * tiles) * BLOCK_N
    if PDL:
        gdc_launch_dependents()
    if PREFETCH:
        # Weights only: ask L2 for this program's slots, row codes and codebook slice while x may not exist yet.
        slot_lines = tl.arange(0, SLOT_LINES) * 64  # 128-byte lines of int16 slots
        _prefetch_l2(slot_base + slot_lines, slot_lines < rows * WIDTH)
        code_lines = tl.arange(0, SLOT_LINES) * 64
        _prefetch_l2(code_base + code_lines, code_lines < rows)
        _prefetch_codebook_slice(slice_base, CODEBOOK_SIZE, PIECE, BLOCK_N, LINE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PRELOAD:
        # One row block holds every row: load the weights into registers before waiting for x, so that
        # under PDL they arrive while the previous kernel still runs; after the wait only x is gathered.
        slots, codebook_rows = _load_bin_rows(slot_base, code_base, slice_base, 0, rows, mask_d, WIDTH, PIECE, BLOCK_N, ROW_BLOCK)
        gammas = _load_gammas(gamma_ptr, slots, NORM)
        if PDL:
            gdc_wait()
        means, rstds = _norm_stats(x_ptr, pid_m, tokens, stride_x, in_features, eps, NORM, BLOCK_M, NORM_BLOCK)
        acc = _add_bin_rows(acc, x_ptr, up_ptr, slots, codebook_rows, gammas, means, rstds, pid_m, tokens, stride_x, in_features,
                            NORM, GATED, BLOCK_M, LOCAL_X, IN_BLOCK)
    else:
        if PDL:
            gdc_wait()  # x is the previous kernel's output
        means, rstds = _norm_stats(x_ptr, pid_m, tokens, stride_x, in_features, eps, NORM, BLOCK_M, NORM_BLOCK)
        for first in range(0, rows, ROW_BLOCK):
            slots, codebook_rows = _load_bin_rows(slot_base, code_base, slice_base, first, rows, mask_d, WIDTH, PIECE, BLOCK_N, ROW_BLOCK)
            gammas = _load_gammas(gamma_ptr, slots, NORM)
            acc = _add_bin_rows(acc, x_ptr, up_ptr, slots, codebook_rows, gammas, means, rstds, pid_m, tokens, stride_x,
                                in_features, NORM, GATED, BLOCK_M, LOCAL_X, IN_BLOCK)
    token_rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + token_rows
    offs_n = head * PIECE + offs_d
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < tokens)[:, None] & mask_d[None, :]
    columns = out_ptr + member * (NUM_CODEBOOKS * PIECE) + offs_n
    tl.store(columns[None, :] + offs_m[:, None] * stride_out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_bin_rows(slot_base, code_base, slice_base, first, rows, mask_d, WIDTH: tl.constexpr, PIECE: tl.constexpr,
                   BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Rows first..first+ROW_BLOCK of one codebook's bins: their slots (-1 past the last row) and codebook rows."""
    offs_r = first + tl.arange(0, ROW_BLOCK)
    mask_r = offs_r < rows
    codes = tl.load(code_base + offs_r, mask=mask_r, other=0).to(tl.int32)
    slots = tl.load(slot_base + offs_r[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :], mask=mask_r[:, None], other=-1).to(tl.int32)
    codebook_rows = tl.load(slice_base + codes[:, None] * PIECE + tl.arange(0, BLOCK_N)[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    return slots, codebook_rows


@triton.jit
def _load_gammas(gamma_ptr, slots, NORM: tl.constexpr):
    """The norm weight at each slot's input (0 in empty slots); without a norm, a placeholder never read."""
    if NORM:
        gammas = tl.load(gamma_ptr + slots, mask=slots >= 0, other=0.0).to(tl.float32)
    else:
        gammas = slots.to(tl.float32)
    return gammas


@triton.jit
def _norm_stats(x_ptr, pid_m, tokens, stride_x, in_features, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                NORM_BLOCK: tl.constexpr):
    """Per token of this program: the mean (0 for RMSNorm) and 1/sqrt(var + eps) of x, in float32, two passes."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = x_ptr + offs_m[:, None] * stride_x
    valid = (offs_m < tokens)[:, None]
    means = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstds = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    if NORM:
        if NORM == 1:
            total = tl.zeros((BLOCK_M, NORM_BLOCK), dtype=tl.float32)
            for start in range(0, in_features, NORM_BLOCK):
                offs = start + tl.arange(0, NORM_BLOCK)
                total += tl.load(rows + offs[None, :], mask=valid & (offs < in_features)[None, :], other=0.0).to(tl.float32)
            means = tl.sum(total, axis=1) / in_features
        squares = tl.zeros((BLOCK_M, NORM_BLOCK), dtype=tl.float32)
        for start in range(0, in_features, NORM_BLOCK):
            offs = start + tl.arange(0, NORM_BLOCK)
            inside = valid & (offs < in_features)[None, :]
            centred = tl.load(rows + offs[None, :], mask=inside, other=0.0).to(tl.float32) - means[:, None]
            centred = tl.where(inside, centred, 0.0)
            squares += centred * centred
        rstds = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / in_features + eps)
    return means, rstds


@triton.jit
def _add_bin_rows(acc, x_ptr, up_ptr, slots, codebook_rows, gammas, means, rstds, pid_m, tokens, stride_x, in_features,
                  NORM: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, LOCAL_X: tl.constexpr, IN_BLOCK: tl.constexpr):
    """acc[t] += sum over the rows of (x[t] summed over the row's slots) * the row's codebook row, per token t.

    With NORM the row sum is of the normalised x: rstd * (sum gamma*x - mean * sum gamma). With
    GATED it is of silu(x) * up. LOCAL_X: x's row (and up's) is loaded whole, with one coalesced
    load, and gathered on chip (``tl.gather``) instead of by one global load per slot.
    """
    used = slots >= 0
    token_rows = tl.arange(0, BLOCK_M)
    for row in tl.static_range(BLOCK_M):
        token = pid_m * BLOCK_M + row
        picked = _gather_row(x_ptr + token * stride_x, slots, used, in_features, token < tokens, LOCAL_X, IN_BLOCK)
        if GATED:
            up = _gather_row(up_ptr + token * stride_x, slots, used, in_features, token < tokens, LOCAL_X, IN_BLOCK)
            picked = picked * tl.sigmoid(picked) * up
        if NORM:
            mean = tl.sum(tl.where(token_rows == row, means, 0.0), axis=0)
            rstd = tl.sum(tl.where(token_rows == row, rstds, 0.0), axis=0)
            sums = rstd * (tl.sum(picked * gammas, axis=1) - mean * tl.sum(gammas, axis=1))
        else:
            sums = tl.sum(picked, axis=1)  # (ROW_BLOCK,)
        part = tl.sum(sums[:, None] * codebook_rows.to(tl.float32), axis=0)  # (BLOCK_N,)
        acc += tl.where(token_rows[:, None] == row, part[None, :], 0.0)
    return acc


@triton.jit
def _gather_row(row_ptr, slots, used, in_features, valid, LOCAL_X: tl.constexpr, IN_BLOCK: tl.constexpr):
    """row[slots] in float32 (0 in empty slots): one global load per slot, or (LOCAL_X) the row loaded whole and
    gathered on chip."""
    if LOCAL_X:
        offs = tl.arange(0, IN_BLOCK)
        whole = tl.load(row_ptr + offs, mask=(offs < in_features) & valid, other=0.0).to(tl.float32)
        flat = tl.reshape(tl.where(used, slots, 0), (slots.shape[0] * slots.shape[1],))
        picked = tl.where(used, tl.reshape(tl.gather(whole, flat, 0), slots.shape), 0.0)
    else:
        picked = tl.load(row_ptr + slots, mask=used & valid, other=0.0).to(tl.float32)
    return picked


def binned_fits(config: TileConfig, codebooks: Tensor) -> bool:
    """The binned kernel takes few-token tiles (its token loop is unrolled) and K up to 1024 (its prefetch list)."""
    return config.kind == BINNED and config.block_m <= 16 and codebooks.shape[1] <= 1024


def linear_binned(
    x: Tensor,
    codebooks: Tensor,
    bins: tuple[Tensor, Tensor],
    bias: Tensor | None,
    config: TileConfig,
    norm: NormSpec | None = None,
    up: Tensor | None = None,
) -> Tensor:
    """y = x W^T + b for few tokens from the codes grouped by value (``bins`` = ``layout.code_bins(indices, K)``).

    ``block_k`` is the rows per step; ``split_k`` does not apply (a program owns its outputs). With
    ``norm``, x is the input of that norm (applied in the kernel; its bias must already be in ``bias``).
    With ``up`` (same shape as x), the layer's input is silu(x) * up, formed in the kernel.
    """
    return linear_binned_group(x, [(codebooks, bins, bias)], config, norm, up)[0]


MAX_GROUP = 3  # layers per launch of the binned kernel (q, k, v)


def linear_binned_group(
    x: Tensor,
    members: list[tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]],
    config: TileConfig,
    norm: NormSpec | None = None,
    up: Tensor | None = None,
) -> list[Tensor]:
    """``linear_binned`` of up to MAX_GROUP layers of one shape on the same ``x``, in one launch.

    ``members``: (codebooks, bins, bias) each, all with the same codebook shape, bin width and bias
    presence. Returns each member's output, as views into one (tokens, members * out) tensor.
    ``norm`` and ``up`` as in ``linear_binned`` (not both).
    """
    if norm is not None and up is not None:
        raise ValueError("the binned kernel applies a norm or a gate to its input, not both")
    if up is not None and up.shape != x.shape:
        raise ValueError(f"gate {tuple(x.shape)} and up {tuple(up.shape)} differ in shape")
    codebooks, (slots, row_codes), bias = members[0]
    num_codebooks, codebook_size, piece = codebooks.shape
    width = slots.shape[2]
    row_counts = [bins[0].shape[1] for _, bins, _ in members]
    out_features = num_codebooks * piece
    in_features = x.shape[-1]
    rows_in = _rows(x.to(codebooks.dtype), in_features)
    up_rows = _rows(up.to(codebooks.dtype), in_features) if up is not None else rows_in
    if up_rows.stride(0) != rows_in.stride(0):  # the kernel reads both with one row stride
        rows_in, up_rows = rows_in.contiguous(), up_rows.contiguous()
    tokens = rows_in.shape[0]
    out = torch.empty(tokens, len(members) * out_features, device=x.device, dtype=x.dtype)
    if tokens:
        block_n = min(config.block_n, _next_power_of_2(piece))
        grid = (len(members) * num_codebooks * _cdiv(piece, block_n), _cdiv(tokens, config.block_m))
        pdl = config.pdl and programmatic_launch_supported(x.device)
        row_block = min(config.block_k, _next_power_of_2(max(row_counts)))
        others = []
        for index in (1, 2):  # members 1 and 2 (member 0's tensors again where there are fewer)
            member_codebooks, (member_slots, member_codes), member_bias = members[min(index, len(members) - 1)]
            others += [member_slots, member_codes, member_codebooks, member_bias if member_bias is not None else member_codebooks,
                       member_slots.shape[1]]
        _rpq_binned_kernel[grid](
            rows_in,
            slots,
            row_codes,
            codebooks,
            bias if bias is not None else codebooks,
            out,
            tokens,
            row_counts[0],
            rows_in.stride(0),
            out.stride(0),
            *others,
            norm.weight if norm is not None else codebooks,
            norm.eps if norm is not None else 0.0,
            in_features,
            up_rows,
            CODEBOOK_SIZE=codebook_size,
            PIECE=piece,
            NUM_CODEBOOKS=num_codebooks,
            MEMBERS=len(members),
            NORM=norm.kind if norm is not None else 0,
            GATED=up is not None,
            NORM_BLOCK=min(1024, _next_power_of_2(in_features)),
            HAS_BIAS=bias is not None,
            WIDTH=width,
            BLOCK_M=config.block_m,
            BLOCK_N=block_n,
            ROW_BLOCK=row_block,
            PREFETCH=config.prefetch and not INTERPRETED and slots.dtype == torch.int16,
            SLOT_LINES=_next_power_of_2(_cdiv(max(row_counts) * max(2 * width, 4), 128)),  # covers slots and row codes
            LINE=128 // codebooks.element_size(),
            PDL=pdl,
            PRELOAD=pdl and max(row_counts) <= row_block,
            LOCAL_X=config.local_x,
            IN_BLOCK=_next_power_of_2(in_features) if config.local_x else 1,
            launch_pdl=pdl,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    grouped = out.view(*x.shape[:-1], len(members) * out_features)
    return [grouped.narrow(-1, index * out_features, out_features) for index in range(len(members))]
