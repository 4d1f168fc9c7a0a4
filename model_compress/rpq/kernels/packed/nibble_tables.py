"""Layers of 4- or 5-bit codes and one 16- or 32-entry int8 table per output row, with the table looked up in
registers by byte permutes instead of loads: the bodies of one fp16 or bf16 token (a GEMV, ``_row_sums``) and of 2 to
64 on tensor cores (``_tile_sums``), which ``nibble_products.py`` launches for a layer or its siblings, and W' decoded
into a temporary for cuBLAS on prompts (``nibble_decode_weight``, any float dtype).

Why a kernel of its own: the general GEMV (``linear.py``) gathers each code's value with a load and converts it
to float32, so a large layer reaches about a fifth of the copy bandwidth. Here a row's table sits in four 32-bit
registers (entries 0-3, 4-7, 8-11, 12-15). Four codes are four nibbles of a 16-bit half-word, which is exactly
the selector ``prmt.b32`` takes, so two permutes look up four codes in entries 0-7 and 8-15, a third spreads the
codes' top bits into byte masks, and one ``lop3`` picks per byte. The bytes become fp16 pairs by a third permute
under the exponent of 1024 (``0x64``), then v / 128 = h / 128 - 9 exactly; pairs of x multiply them with
``fma.rn.f16x2``. Eight codes (one 32-bit word of the packed row) give one partial sum of eight fp16 products
(each at most |x|, so no overflow below |x| = 8192), added in float32; the row's scale times 128 comes last.
For several tokens the same lookup hands the eight values v / 128 to ``tl.dot`` instead.

A 32-entry table takes eight registers: entries 16-31 are looked up the same way, and the codes' fifth bits,
spread to byte masks by one multiply and a sign-replicating permute, pick between the halves.

The stored layout is ``layout.pack_codes``: at 4 bits code c of a row sits at bit 4c, so code word j of a row holds
codes 8j .. 8j + 7 and x[8j .. 8j + 7] is the 16 bytes next to it; at 5 bits the same nibbles come first, then
byte j of the top-bit plane holds the fifth bits of codes 8j .. 8j + 7 (``layout.stored_as_planes``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton.common import INTERPRETED, _cdiv, _wait_for_inputs
from ..launch.direct_launch import DirectLaunch
from .rotate import rotated_rows


def _lookup_four(tables: list[str], high: str | None) -> str:
    """PTX: the table bytes (value + 128) of the four codes whose low nibbles are the low 16 bits of ``codes``, into
    ``bytes``; with ``high`` (5-bit codes), bit i of its low 4 bits is code i's top bit and ``tables`` has 8 words."""
    ptx = [
        "and.b32 sel, codes, 0x7777;",  # bit 3 of a selector nibble would ask prmt to replicate a sign
        f"prmt.b32 low, {tables[0]}, {tables[1]}, sel;",  # entries 0-7
        f"prmt.b32 high, {tables[2]}, {tables[3]}, sel;",  # entries 8-15
        "shl.b32 shifted, codes, 4;",
        "prmt.b32 mask, shifted, codes, 0xD9C8;",  # byte i: 0xFF where code i's bit 3 is set (sign of its nibble)
        "lop3.b32 bytes, high, low, mask, 0xE4;",  # (high & mask) | (low & ~mask)
    ]
    if high is not None:
        ptx += [
            f"prmt.b32 low, {tables[4]}, {tables[5]}, sel;",  # entries 16-23
            f"prmt.b32 high, {tables[6]}, {tables[7]}, sel;",  # entries 24-31
            "lop3.b32 upper, high, low, mask, 0xE4;",
            f"and.b32 spread, {high}, 15;",
            "mul.lo.u32 spread, spread, 0x10204081;",  # bit i of the top bits lands on bit 8 i + 7
            "prmt.b32 mask, spread, 0, 0xBA98;",  # byte i: 0xFF where code i's bit 4 is set
            "lop3.b32 bytes, upper, bytes, mask, 0xE4;",
        ]
    return "\n".join(ptx)


def _eight_codes_ptx(tables: list[str], word: str, high: str | None, per_pair: Callable[[int], str]) -> str:
    """PTX for the eight codes of one code word: ``per_pair(p)`` runs with ``pair`` holding the fp16 values v / 128 of
    codes 2p, 2p + 1. Bytes become fp16 under the exponent of 1024 (0x64XX is 1024 + XX), then h / 128 - 9 = v / 128
    exactly."""
    declared = ".reg .b32 sel, low, high, mask, shifted, bytes, pair, codes, inv128, minus9, upper, spread, top;"
    ptx = [declared, "mov.b32 inv128, 0x20002000;", "mov.b32 minus9, 0xC880C880;", f"mov.b32 codes, {word};"]
    if high is not None:
        ptx.append(f"mov.b32 top, {high};")
    for half in range(2):
        if half:
            ptx.append("shr.u32 codes, codes, 16;")
            if high is not None:
                ptx.append("shr.u32 top, top, 4;")
        ptx.append(_lookup_four(tables, "top" if high is not None else None))
        for pair, selector in enumerate(("0x4140", "0x4342")):
            ptx += [f"prmt.b32 pair, bytes, 0x64646464, {selector};", "fma.rn.f16x2 pair, pair, inv128, minus9;",
                    per_pair(2 * half + pair)]
    return "{\n" + "\n".join(ptx) + "\n}"


def _times_x_ptx(bits: int) -> str:
    """$0: float32 sum of the eight products v / 128 * x; $1: eight codes' low nibbles; for 5 bits $2: their top bits;
    then the row's table words; last two: x[8j .. 8j + 3] and x[8j + 4 .. 8j + 7] as fp16 pairs (64-bit)."""
    first = 2 if bits == 4 else 3
    tables = [f"${first + i}" for i in range(4 if bits == 4 else 8)]
    x_low, x_high = f"${first + len(tables)}", f"${first + len(tables) + 1}"
    body = _eight_codes_ptx(tables, "$1", None if bits == 4 else "$2", lambda p: f"fma.rn.f16x2 acc, pair, x{p}, acc;")
    prologue = (".reg .b32 acc, x0, x1, x2, x3;\n.reg .b16 first, second;\n"
                f"mov.b64 {{x0, x1}}, {x_low};\nmov.b64 {{x2, x3}}, {x_high};\nmov.b32 acc, 0;\n")
    epilogue = "\nmov.b32 {first, second}, acc;\nadd.rn.f16 first, first, second;\ncvt.f32.f16 $0, first;\n"
    return "{\n" + prologue + body + epilogue + "}"


def _values_ptx(bits: int) -> str:
    """$0-$7: the fp16 values v / 128 of codes 8j .. 8j + 7; $8: their low nibbles; for 5 bits $9: their top bits; then
    the row's table words."""
    first = 9 if bits == 4 else 10
    tables = [f"${first + i}" for i in range(4 if bits == 4 else 8)]
    return _eight_codes_ptx(tables, "$8", None if bits == 4 else "$9", lambda p: f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, pair;")


_TIMES_X_4 = tl.constexpr(_times_x_ptx(4))
_TIMES_X_5 = tl.constexpr(_times_x_ptx(5))
_VALUES_4 = tl.constexpr(_values_ptx(4))
_VALUES_5 = tl.constexpr(_values_ptx(5))
_UNSIGNED = tl.constexpr(-2139062144)  # 0x80808080 as an int32: int8 value v becomes byte v + 128
# Triton's CPU interpreter runs no inline PTX: there the lookups below take a plain-arithmetic stand-in (the same
# values; sums rounded in another order), so the kernels around them run in CPU tests (tests/rpq/test_nibble_interpreted.py).
_EMULATED = tl.constexpr(INTERPRETED)


@triton.jit
def _row_tables(codebooks_ptr, rows, BITS: tl.constexpr):
    """The 32-bit words of each row's int8 table (4 words for 16 entries, 8 for 32), bytes shifted to v + 128, as
    (rows, 1) tensors; a 16-entry table repeats its four words in the last four (never read)."""
    words = 1 << (BITS - 2)
    tables = tl.multiple_of(codebooks_ptr.to(tl.pointer_type(tl.int32)), 16) + rows * words  # a pointer cast forgets alignment
    t0 = (tl.load(tables) ^ _UNSIGNED)[:, None]
    t1 = (tl.load(tables + 1) ^ _UNSIGNED)[:, None]
    t2 = (tl.load(tables + 2) ^ _UNSIGNED)[:, None]
    t3 = (tl.load(tables + 3) ^ _UNSIGNED)[:, None]
    if BITS == 5:
        t4 = (tl.load(tables + 4) ^ _UNSIGNED)[:, None]
        t5 = (tl.load(tables + 5) ^ _UNSIGNED)[:, None]
        t6 = (tl.load(tables + 6) ^ _UNSIGNED)[:, None]
        t7 = (tl.load(tables + 7) ^ _UNSIGNED)[:, None]
    else:
        t4, t5, t6, t7 = t0, t1, t2, t3
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _code_rows(codes_ptr, rows, words_per_row, BITS: tl.constexpr):
    """Each row's low nibbles as int32 words (word j: codes 8j .. 8j + 7), and for 5 bits its top-bit plane as bytes
    (byte j: the top bits of the same eight codes), as (rows, 1) pointers."""
    row_words = words_per_row if BITS == 4 else words_per_row * 5 // 4  # the 1-bit plane adds a quarter
    first = rows.to(tl.int64)[:, None] * row_words
    nibbles = tl.multiple_of(codes_ptr.to(tl.pointer_type(tl.int32)), 16) + first
    return nibbles, codes_ptr + first * 4 + words_per_row * 4


@triton.jit
def _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, E: tl.constexpr, BITS: tl.constexpr):
    """The interpreter's stand-in for the byte-permute lookup: v / 128 (fp16) of code E of each word, by shifts and
    selects on the same registers (entry c is byte c % 4 of table word c // 4, stored as v + 128)."""
    code = (words >> (4 * E)) & 15
    if BITS == 5:
        code += ((top >> E) & 1) * 16
    word = code // 4
    table = tl.where(word == 0, t0, tl.where(word == 1, t1, tl.where(word == 2, t2, tl.where(word == 3, t3, tl.where(
        word == 4, t4, tl.where(word == 5, t5, tl.where(word == 6, t6, t7)))))))
    stored = (table >> ((code % 4) * 8)) & 0xFF
    return ((stored - 128).to(tl.float32) / 128.0).to(tl.float16)


@triton.jit
def _emulated_x(x_low, x_high, E: tl.constexpr):
    """x[8 j + E] (fp16) from the two 64-bit words the one-token kernels load."""
    word = x_low if E < 4 else x_high
    return ((word >> (16 * (E % 4))) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _emulated_times_x(words, top, t0, t1, t2, t3, t4, t5, t6, t7, x_low, x_high, BITS: tl.constexpr):
    """The interpreter's stand-in for ``_times_x``: two fp16 lanes (even and odd codes) summed in the PTX's order."""
    even = (_emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 0, BITS) * _emulated_x(x_low, x_high, 0))
    odd = (_emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 1, BITS) * _emulated_x(x_low, x_high, 1))
    even += _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 2, BITS) * _emulated_x(x_low, x_high, 2)
    odd += _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 3, BITS) * _emulated_x(x_low, x_high, 3)
    even += _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 4, BITS) * _emulated_x(x_low, x_high, 4)
    odd += _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 5, BITS) * _emulated_x(x_low, x_high, 5)
    even += _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 6, BITS) * _emulated_x(x_low, x_high, 6)
    odd += _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 7, BITS) * _emulated_x(x_low, x_high, 7)
    return (even + odd).to(tl.float32)


@triton.jit
def _times_x(words, top, t0, t1, t2, t3, t4, t5, t6, t7, x_low, x_high, BITS: tl.constexpr):
    """Float32 sums of the eight products v / 128 * x of each code word."""
    if _EMULATED:
        return _emulated_times_x(words, top, t0, t1, t2, t3, t4, t5, t6, t7, x_low, x_high, BITS)
    if BITS == 4:
        return tl.inline_asm_elementwise(_TIMES_X_4, "=r,r,r,r,r,r,l,l", [words, t0, t1, t2, t3, x_low, x_high],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_TIMES_X_5, "=r,r,r,r,r,r,r,r,r,r,r,l,l",
                                     [words, top, t0, t1, t2, t3, t4, t5, t6, t7, x_low, x_high], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _values(words, top, t0, t1, t2, t3, t4, t5, t6, t7, BITS: tl.constexpr):
    """The values v / 128 (fp16) of codes 8j .. 8j + 7 of each code word, as one (rows, 8 words) tile: column 8 j + e
    holds code 8 j + e (each join adds the minor axis, so the last join picks the lowest bit of e)."""
    if _EMULATED:
        v0 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 0, BITS)
        v1 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 1, BITS)
        v2 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 2, BITS)
        v3 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 3, BITS)
        v4 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 4, BITS)
        v5 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 5, BITS)
        v6 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 6, BITS)
        v7 = _emulated_value(words, top, t0, t1, t2, t3, t4, t5, t6, t7, 7, BITS)
    elif BITS == 4:
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _VALUES_4, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [words, t0, t1, t2, t3], dtype=(tl.float16,) * 8, is_pure=True,
            pack=1)
    else:
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _VALUES_5, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r,r", [words, top, t0, t1, t2, t3, t4, t5, t6, t7],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(w, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _row_sums(x_ptr, up_ptr, codes_ptr, codebooks_ptr, scales_ptr, signs_ptr, hadamard_ptr, rotation_scale, offs_n, mask_n,
              words_per_row, chunk_words, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
              X_FP16: tl.constexpr, PDL: tl.constexpr, ROTATE: tl.constexpr, PACKED_SIGNS: tl.constexpr, GATED: tl.constexpr):
    """One token: rows ``offs_n`` of W' x over this program's slice of the inputs (grid axis 2), float32. fp16 tokens
    multiply in fp16 pairs inside the lookup (``_times_x``); bf16 ones take the looked-up values to float32 and
    multiply there (bf16 has no pair arithmetic that keeps the eight-product sum exact enough).

    The tables and each step's code words are loaded one step ahead of the token: under programmatic dependent launch
    (``PDL``) the first step's weights arrive while the kernel before, which writes x, still runs. ``ROTATE`` (a
    Hadamard block of ``ROTATE`` inputs, dividing 8 BLOCK_W by 16 or more): x is the layer's input before its rotation
    and each step's slice is rotated as it is loaded (``rotated_rows``), so no launch writes x R first; with ``GATED``
    x is a SiLU gate and ``up_ptr`` its up projection, and the slice is (silu(gate) * up) R."""
    words_per_row = tl.multiple_of(words_per_row, 4)  # nibble_serves: in_features % 32 == 0
    chunk_words = tl.multiple_of(chunk_words, BLOCK_W)  # input_split hands out whole BLOCK_K slices
    rows = tl.where(mask_n, offs_n, 0)
    t0, t1, t2, t3, t4, t5, t6, t7 = _row_tables(codebooks_ptr, rows, BITS)
    nibbles, tops = _code_rows(codes_ptr, rows, words_per_row, BITS)
    x_pairs = tl.multiple_of(x_ptr.to(tl.pointer_type(tl.int64)), 16)
    if X_FP16:
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_W * 8), dtype=tl.float32)
    w_begin = tl.program_id(2) * chunk_words
    w_end = tl.multiple_of(tl.minimum(w_begin + chunk_words, words_per_row), 4)  # masks whole 16-byte vectors
    first_w = w_begin + tl.arange(0, BLOCK_W)
    words, top = _code_words(nibbles, tops, first_w, mask_n[:, None] & (first_w < w_end)[None, :], BITS)
    scale = tl.load(scales_ptr + rows, mask=mask_n, other=0.0).to(tl.float32) * 128.0
    _wait_for_inputs(PDL)
    for step in range(0, chunk_words, BLOCK_W):
        offs_w = w_begin + step + tl.arange(0, BLOCK_W)
        mask_w = offs_w < w_end
        offs_k = (w_begin + step) * 8 + tl.arange(0, BLOCK_W * 8)
        if ROTATE:
            one = tl.arange(0, 1)
            x = tl.reshape(rotated_rows(x_ptr, up_ptr, signs_ptr, hadamard_ptr, one, one < 1, 0, offs_k, offs_k < w_end * 8,
                                        rotation_scale, ROTATE, 1, BLOCK_W * 8, PACKED_SIGNS, GATED), (BLOCK_W * 8,))
            if X_FP16:
                x_low, x_high = _as_pairs(x, BLOCK_W)
                acc += _times_x(words, top, t0, t1, t2, t3, t4, t5, t6, t7, x_low[None, :], x_high[None, :], BITS)
            else:
                acc += _values(words, top, t0, t1, t2, t3, t4, t5, t6, t7, BITS).to(tl.float32) * x.to(tl.float32)[None, :]
        elif X_FP16:
            x_low = tl.load(x_pairs + 2 * offs_w, mask=mask_w, other=0)[None, :]
            x_high = tl.load(x_pairs + 2 * offs_w + 1, mask=mask_w, other=0)[None, :]
            acc += _times_x(words, top, t0, t1, t2, t3, t4, t5, t6, t7, x_low, x_high, BITS)
        else:
            x = tl.load(x_ptr + offs_k, mask=offs_k < w_end * 8, other=0.0).to(tl.float32)
            acc += _values(words, top, t0, t1, t2, t3, t4, t5, t6, t7, BITS).to(tl.float32) * x[None, :]
        next_w = offs_w + BLOCK_W  # the next step's words (none past the slice: masked)
        words, top = _code_words(nibbles, tops, next_w, mask_n[:, None] & (next_w < w_end)[None, :], BITS)
    return tl.sum(acc, axis=1) * scale


@triton.jit
def _as_pairs(x, BLOCK_W: tl.constexpr):
    """fp16 x[8 j .. 8 j + 3] and x[8 j + 4 .. 8 j + 7] as 64-bit words (the layout ``_times_x`` loads), j < BLOCK_W."""
    halves = x.to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
    quads = tl.reshape(halves, (BLOCK_W * 2, 4))
    packed = tl.sum(quads << (tl.arange(0, 4).to(tl.int64) * 16)[None, :], axis=1)  # disjoint bit fields: the sum is an or
    return tl.split(tl.reshape(packed, (BLOCK_W, 2)))


@triton.jit
def _code_words(nibbles, tops, offs_w, mask, BITS: tl.constexpr):
    """Code words ``offs_w`` of each row (low nibbles) and, for 5 bits, their top-bit bytes (else the words again)."""
    words = tl.load(nibbles + offs_w[None, :], mask=mask, other=0)
    top = tl.load(tops + offs_w[None, :], mask=mask, other=0).to(tl.int32) if BITS == 5 else words
    return words, top


@triton.jit
def _tile_sums(x_ptr, up_ptr, codes_ptr, codebooks_ptr, scales_ptr, signs_ptr, hadamard_ptr, rotation_scale, offs_m, mask_m,
               offs_n, mask_n, words_per_row, stride_x, chunk_words, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr, ROTATE: tl.constexpr,
               PACKED_SIGNS: tl.constexpr, GATED: tl.constexpr):
    """Tokens ``offs_m`` times rows ``offs_n`` of W' over this program's slice of the inputs (grid axis 2), float32, on
    tensor cores. As in ``_row_sums``, code words are loaded a step ahead, the first before waiting for x (``PDL``), and
    ``ROTATE`` / ``GATED`` rotate each step's x tile (or form (silu(gate) * up) R) as it is loaded."""
    rows = tl.where(mask_n, offs_n, 0)
    t0, t1, t2, t3, t4, t5, t6, t7 = _row_tables(codebooks_ptr, rows, BITS)
    nibbles, tops = _code_rows(codes_ptr, rows, words_per_row, BITS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_begin = tl.program_id(2) * chunk_words
    w_end = tl.minimum(w_begin + chunk_words, words_per_row)
    first_w = w_begin + tl.arange(0, BLOCK_W)
    words, top = _code_words(nibbles, tops, first_w, mask_n[:, None] & (first_w < w_end)[None, :], BITS)
    scale = tl.load(scales_ptr + rows, mask=mask_n, other=0.0).to(tl.float32) * 128.0
    _wait_for_inputs(PDL)
    for step in range(0, chunk_words, BLOCK_W):
        offs_w = w_begin + step + tl.arange(0, BLOCK_W)
        w = _values(words, top, t0, t1, t2, t3, t4, t5, t6, t7, BITS).to(x_ptr.dtype.element_ty)  # v / 128: exact in bf16 too
        offs_k = (w_begin + step) * 8 + tl.arange(0, BLOCK_W * 8)
        if ROTATE:
            x = rotated_rows(x_ptr, up_ptr, signs_ptr, hadamard_ptr, offs_m, mask_m, stride_x, offs_k, offs_k < w_end * 8,
                             rotation_scale, ROTATE, BLOCK_M, BLOCK_W * 8, PACKED_SIGNS, GATED)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < w_end * 8)[None, :], other=0.0)
        next_w = offs_w + BLOCK_W
        words, top = _code_words(nibbles, tops, next_w, mask_n[:, None] & (next_w < w_end)[None, :], BITS)
        acc = tl.dot(x, tl.trans(w), acc)
    return acc * scale[None, :]


@triton.jit
def _nibble_decode_kernel(codes_ptr, codebooks_ptr, scales_ptr, out_ptr, out_features, words_per_row, BITS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """W'[rows, 8 j + e] for a (BLOCK_N, BLOCK_W words) tile: looked up, scaled in float32, stored in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_n = offs_n < out_features
    rows = tl.where(mask_n, offs_n, 0)
    t0, t1, t2, t3, t4, t5, t6, t7 = _row_tables(codebooks_ptr, rows, BITS)
    nibbles, tops = _code_rows(codes_ptr, rows, words_per_row, BITS)
    mask = mask_n[:, None] & (offs_w < words_per_row)[None, :]
    words = tl.load(nibbles + offs_w[None, :], mask=mask, other=0)
    top = tl.load(tops + offs_w[None, :], mask=mask, other=0).to(tl.int32) if BITS == 5 else words
    w = _values(words, top, t0, t1, t2, t3, t4, t5, t6, t7, BITS).to(tl.float32)
    w = w * (tl.load(scales_ptr + rows, mask=mask_n, other=0.0).to(tl.float32) * 128.0)[:, None]
    offs_k = tl.program_id(1) * BLOCK_W * 8 + tl.arange(0, BLOCK_W * 8)
    in_features = words_per_row * 8
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * in_features + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_k < in_features)[None, :])


def nibble_serves(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, in_features: int) -> bool:
    """Whether ``nibble_linear`` computes this call: fp16 or bf16 tokens, 4- or 5-bit codes (the latter as planes), one
    16- or 32-entry int8 table per output row with its scale, whole 16-byte vectors of code words (in_features a
    multiple of 32) and aligned buffers (one token reads x as 8-byte pairs, so its x is aligned too)."""
    return (
        x.dtype in (torch.float16, torch.bfloat16) and nibble_decode_serves(codes, codebooks, scales, bits, in_features)
        and (x.numel() != in_features or (x.data_ptr() % 16 == 0 and x.stride(-1) == 1))
    )


def nibble_decode_serves(codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, in_features: int) -> bool:
    """Whether ``nibble_decode_weight`` decodes this layer: ``nibble_serves``'s format and alignment, any x dtype."""
    return (
        bits in (4, 5) and scales is not None and codebooks.dtype == torch.int8 and codebooks.shape[1:] == (1 << bits, 1)
        and codebooks.is_contiguous() and in_features % 32 == 0 and codes.is_contiguous() and codes.data_ptr() % 16 == 0
        and codebooks.data_ptr() % 16 == 0
    )


NIBBLE_DECODE_ROWS, NIBBLE_DECODE_WORDS = 32, 32  # one program: 32 rows x 256 inputs


def nibble_decode_plan(codes: Tensor, codebooks: Tensor, scales: Tensor, bits: int, in_features: int,
                       dtype: torch.dtype) -> Callable[[], Tensor]:
    """A call that returns W' (out, in) in ``dtype``, a new temporary each time (``nibble_decode_serves``)."""
    out_features = codebooks.shape[0]
    words_per_row = in_features // 8
    grid = (_cdiv(out_features, NIBBLE_DECODE_ROWS), _cdiv(words_per_row, NIBBLE_DECODE_WORDS))
    launch = DirectLaunch(_nibble_decode_kernel, grid, BITS=bits, BLOCK_N=NIBBLE_DECODE_ROWS, BLOCK_W=NIBBLE_DECODE_WORDS,
                          num_warps=4)
    device = codes.device

    def decode() -> Tensor:
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        launch(codes, codebooks, scales, weight, out_features, words_per_row)
        return weight

    return decode


def nibble_decode_weight(codes: Tensor, codebooks: Tensor, scales: Tensor, bits: int, in_features: int,
                         dtype: torch.dtype) -> Tensor:
    """W' (out, in) in ``dtype``, a new temporary (``nibble_decode_serves``)."""
    return nibble_decode_plan(codes, codebooks, scales, bits, in_features, dtype)()
