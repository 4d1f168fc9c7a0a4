"""Triton kernels for the packed RPQ forms the bit budget picks: b-bit codes packed along the rows (1 to 16 bits),
codebooks of D = 1, 2 or 4 values per code stored in int8 with one scale per codebook or in a float dtype, and
the input rotation.

Each launching function has a ``*_plan`` form: the same work as a call for inputs shaped like the one given, with the
grid, split and constants worked out once and the kernel launched past Triton's JIT after its first call
(``launch/direct_launch.py``); the layers keep their plans (``kernels/plans.py``) so eager decoding pays the host
cost of a launch, not of the routing.

``linear``: y = x W'^T + b with W' decoded tile by tile in registers (one token up to a few dozen).
``nibble_tables``: 4- and 5-bit codes with 16- and 32-entry int8 row tables looked up by byte permutes, and W' for
prompts; ``nibble_products``: the product on 1 to 64 fp16 or bf16 tokens for one layer or its siblings in one launch,
x rotated (and a SiLU gate formed) as it is loaded; ``nibble_prompts``: the same formats for prompts, on tensor cores
with the looked-up tile as the left operand. ``decode``: W' into
a temporary for cuBLAS (prompts), rows of an embedding table, chunks of a tied head's table. ``head``: a tied head's
logits from the codebooks in registers, the table never decoded; ``head_scores``: the same from per-entry scores and a
gather-sum over the codes. ``rotate``: x R in one launch; ``prologue``: x R written by
the pre-norm or the SiLU gate that makes x.
"""

from __future__ import annotations

from .decode import decode_linear_plan, decode_linear_weight, decode_plan, decode_table_rows
from .head import RowBounds, packed_head
from .head_scores import scored_head
from .linear import packed_linear, packed_linear_plan
from .nibble_products import nibble_group_gemv, nibble_group_plan, nibble_linear, nibble_linear_plan
from .nibble_prompts import nibble_prompt_linear, nibble_prompt_plan, nibble_prompt_serves
from .nibble_tables import nibble_decode_plan, nibble_decode_serves, nibble_decode_weight, nibble_serves
from .prologue import gated_silu_rotate, gated_silu_rotate_plan, norm_rotate, norm_rotate_plan
from .rotate import rotate, rotate_plan, unrotate
from ..triton.common import programmatic_launch_supported
from ..config.packed_routes import rotates_in_load

__all__ = ["decode_linear_plan", "decode_linear_weight", "decode_plan", "decode_table_rows", "gated_silu_rotate", "gated_silu_rotate_plan",
           "nibble_decode_plan", "nibble_decode_serves", "nibble_decode_weight", "nibble_group_gemv", "nibble_group_plan",
           "nibble_linear", "nibble_linear_plan", "nibble_prompt_linear", "nibble_prompt_plan", "nibble_prompt_serves", "nibble_serves", "norm_rotate", "norm_rotate_plan", "packed_head", "RowBounds", "scored_head",
           "packed_linear", "packed_linear_plan", "programmatic_launch_supported", "rotate", "rotate_plan", "rotates_in_load", "unrotate"]
