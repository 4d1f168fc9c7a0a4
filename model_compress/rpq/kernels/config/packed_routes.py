"""Tiles of the packed-code kernels (``kernels/packed``) by token count: plain data, importable without Triton.

One token takes the broadcast multiply-sum (BLOCK_M = 1); 2 to ``PACKED_MAX_TOKENS`` tokens take tensor cores on
16 or more rows; more tokens decode W' into a temporary and call cuBLAS, where the GEMM's cost hides the decode.
The tiles were chosen on an H100 by ``benchmarks/rpq/packed_kernels.py --sweep`` (benchmarks/RESULTS.md): the lowest
mean time ratio to the dense cuBLAS layer over SmolLM2-135M's and Llama-2-7B's shapes, 4-bit codes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackedTile:
    """One launch shape of ``packed_linear``. The inputs are split until about ``programs_per_sm`` programs run per
    multiprocessor, at most ``max_split`` of them sharing one output tile."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    max_split: int = 16
    programs_per_sm: int = 8

    def describe(self) -> str:
        return (f"m{self.block_m} n{self.block_n} k{self.block_k} w{self.num_warps} s{self.num_stages} split<={self.max_split}"
                f" p{self.programs_per_sm}")


# (largest token count, tile); calls above the last bound decode W' and call cuBLAS.
PACKED_ROUTES: tuple[tuple[int, PackedTile], ...] = (
    (1, PackedTile(1, 4, 512, num_warps=2, num_stages=2, max_split=32, programs_per_sm=8)),
    (16, PackedTile(16, 32, 128, num_warps=4, num_stages=3, max_split=16, programs_per_sm=4)),
    (64, PackedTile(64, 64, 64, num_warps=4, num_stages=3, max_split=16, programs_per_sm=4)),
)
# fp16 tokens through 4-bit codes and a 16-entry int8 table per output row: the byte-permute kernels
# (``packed/nibble_tables.py``), the same buckets; block_k counts codes, 8 to a 32-bit word. Chosen on an H100 by
# ``packed_kernels.py --nibble-sweep`` (benchmarks/RESULTS.md), the lowest mean time ratio to dense over the same shapes.
# Code widths routed to them: 4-bit codes, and 5-bit codes (32-entry tables, the top bits as a plane).
NIBBLE_ROUTED_BITS = (4, 5)
# Token dtypes routed to the byte-permute kernels for 1 to 64 tokens. bf16 tokens run the same kernels (the looked-up
# values are exact in bf16; one token multiplies in float32, ``nibble_tables._row_sums``): on an H100
# (``benchmarks/rpq/nibble_bf16.py``, RESULTS.md) they took 2.6-26.7 us against 4.3-74.0 us for the general kernels,
# within 0-35% of the fp16 tokens' time on the same layers.
NIBBLE_ROUTED_DTYPES = ("float16", "bfloat16")
# Sibling layers that read the same tokens (q/k/v, gate/up) in one byte-permute launch (``packed/nibble_products.py``,
# ``fusions/packed_groups.py``), from one token up to NIBBLE_GROUP_TOKENS (NIBBLE_ROUTES' last bound, set below).
NIBBLE_GROUPS = True


def byte_permute_format(piece: int, codebook_size: int, codebook_dtype: str, columns: int) -> bool:
    """Whether the byte-permute kernels compute a Linear stored this way: one int8 table per output row (D = 1) of a
    routed code width, over a multiple of 32 inputs. The other formats take the general kernels, which read a code
    at a time: 3-bit tables at 0.3x the dense layer's speed at Llama-2-7B's shapes, 2-row vectors 0.9-1.1x
    (benchmarks/RESULTS.md)."""
    return (piece == 1 and codebook_dtype == "int8" and columns % 32 == 0
            and any(codebook_size == 1 << bits for bits in NIBBLE_ROUTED_BITS))


NIBBLE_ROUTES: tuple[tuple[int, PackedTile], ...] = (
    (1, PackedTile(1, 8, 1024, num_warps=4, num_stages=2, max_split=32, programs_per_sm=8)),
    (16, PackedTile(16, 64, 128, num_warps=4, num_stages=2, max_split=16, programs_per_sm=4)),
    (64, PackedTile(64, 64, 128, num_warps=4, num_stages=2, max_split=16, programs_per_sm=4)),
)
NIBBLE_GROUP_TOKENS = NIBBLE_ROUTES[-1][0]
# Prompts (more tokens than NIBBLE_ROUTES' last bound) through the same formats, fp16 or bf16: on tensor cores with W'
# looked up in registers as the product's left operand (``packed/nibble_prompts.py``, one launch), or W' decoded into a
# temporary for cuBLAS (two launches and a temporary of the layer's size). Measured on an H100 (benchmarks/RESULTS.md):
# the prompt kernel takes more device time than decode + cuBLAS (2.1-2.6x the dense layer's time against 1.3-1.8x,
# averaged over SmolLM2's and Llama-2-7B's shapes at 128-2,048 tokens; faster only on the 7B shapes at 128 tokens),
# but a launch less per layer, and an eager prefill of a small model waits on launches, not on kernels (SmolLM2's
# shapes, 512 tokens: 19.1 ms with the prompt kernel, 25.9 ms with decode + cuBLAS, of which 3-5 ms on the GPU).
# Hence the prompt kernel up to NIBBLE_PROMPT_MAX_TOKENS tokens, and beyond while the layer's product stays under
# NIBBLE_PROMPT_MAX_MACS multiply-adds (a small layer, whose extra device time is below a launch's host time); decode
# + cuBLAS for the rest. The ``fused_prompts`` option off sends every prompt to decode + cuBLAS.
NIBBLE_PROMPT_MAX_TOKENS = 512
NIBBLE_PROMPT_MAX_MACS = 1 << 31
# (largest token count, tile) for the prompt kernel: block_m counts tokens, block_n rows, block_k codes; the lowest mean
# time ratio to dense over the seven shapes in ``packed_kernels.py --prompt-sweep`` (16- and 32-entry tables).
NIBBLE_PROMPT_ROUTES: tuple[tuple[int, PackedTile], ...] = (
    (128, PackedTile(64, 64, 128, num_warps=4, num_stages=3, max_split=1, programs_per_sm=1)),
    (1 << 62, PackedTile(128, 64, 64, num_warps=4, num_stages=3, max_split=1, programs_per_sm=1)),
)


def rotates_in_load(block: int, tile: PackedTile) -> bool:
    """Whether a byte-permute launch of ``tile`` can rotate x as it loads it (1 to 64 tokens): each step's slice of
    ``tile.block_k`` inputs is whole Hadamard blocks of ``block``, and a step's rows of them number 16 or more (tensor
    cores multiply 16 rows or more)."""
    return block >= 16 and tile.block_k % block == 0 and tile.block_m * tile.block_k // block >= 16


def layer_rotates_in_load(piece: int, codebook_size: int, codebook_dtype: str, columns: int, block: int | None) -> bool:
    """Whether a rotated Linear stored this way rotates its input inside its launch on CUDA for 1 to NIBBLE_GROUP_TOKENS
    tokens (the byte-permute kernels and their sibling launch): what a traced graph relies on to leave the rotation out
    of the norm before it."""
    return (block is not None and byte_permute_format(piece, codebook_size, codebook_dtype, columns)
            and all(rotates_in_load(block, tile) for _, tile in NIBBLE_ROUTES))


def nibble_prompt_tile(tokens: int, in_features: int, out_features: int) -> PackedTile | None:
    """The prompt kernel's tile for ``tokens`` tokens through an in -> out layer, or None: decode W' for cuBLAS."""
    if tokens > NIBBLE_PROMPT_MAX_TOKENS and tokens * in_features * out_features > NIBBLE_PROMPT_MAX_MACS:
        return None
    return packed_tile(tokens, NIBBLE_PROMPT_ROUTES)


# A tied head over a packed table decodes its rows in registers for up to HEAD_FUSED_TOKENS tokens (``packed/head.py``),
# else decodes its table in chunks of at most HEAD_CHUNK_BYTES and calls cuBLAS (a chunk is alive only during its
# product). On an H100 (benchmarks/rpq/head_route.py) decode + cuBLAS was the faster at every token count, 1 to 64,
# on SmolLM2's and Qwen2.5-0.5B's heads (SmolLM2, 7-bit codes, t=1: 70 us against 192), so the fused kernel is not
# routed; a 16 MB chunk is what the faster route adds to the memory held while decoding.
HEAD_FUSED_TOKENS = 0
HEAD_CHUNK_BYTES = 16 * 1024 * 1024
# Up to HEAD_SCORE_TOKENS tokens the head may instead score each codebook entry once and gather-sum over the codes read
# in place (``packed/head_scores.py``: 12 MB read for SmolLM2's head where decode + cuBLAS writes and reads 57 MB).
# Checked against the decoded table on Triton's CPU interpreter; not timed on a GPU yet, so not routed until
# benchmarks/rpq/head_route.py measures it faster than decode + cuBLAS.
HEAD_SCORE_TOKENS = 0


# What the packed kernels read: codes of 1 to 16 bits (1, 2, 4 and 8 as whole byte tiles, the rest code by code), any
# number of values per code, int8 codebooks with a scale each or float ones. Every format a bit budget offers is one.
SERVED_CODE_BITS = range(1, 17)


def serves(code_bits: int) -> bool:
    """Whether the packed kernels run a layer whose codes take ``code_bits`` bits."""
    return code_bits in SERVED_CODE_BITS


def packed_tile(tokens: int, routes: tuple[tuple[int, PackedTile], ...] = PACKED_ROUTES) -> PackedTile | None:
    """The tile for a call of ``tokens`` rows, or None: decode W' and use cuBLAS."""
    for largest, tile in routes:
        if tokens <= largest:
            return tile
    return None
