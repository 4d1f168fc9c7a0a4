"""The byte-permute kernels' Triton code around their PTX lookups, on Triton's CPU interpreter: the one-token GEMV and
the 2-64-token tensor-core tiles, the sibling launch (three members, a joined bias), split-K (each plan called twice:
the counters come back to 0), the input rotated as the kernel loads it (signs as bits and as +-1 values), and down_proj
forming (silu(gate) * up) R in its load (gate and up views of one buffer, as the sibling launch hands them over), at
one token and a few; 4- and 5-bit codes. The interpreter runs no inline PTX, so the lookups take the plain-arithmetic stand-in of
``nibble_tables._emulated_value``; ``test_packed_kernels.py`` checks the real ones on a GPU. bf16 only where no
``tl.dot`` runs (the interpreter's bf16 dot returns garbage: Triton 3.6).

Needs Triton (the CPU wheel of torch comes without it, so CI skips this file); runs in a child process because
``TRITON_INTERPRET`` must be set before Triton is imported.
"""

from __future__ import annotations

import pytest

from ..conftest import interpreted_worst

pytest.importorskip("triton", reason="needs Triton (its interpreter)")

CHECK = r'''
import torch
import torch.nn.functional as F
from model_compress.rpq.kernels import packed, packed_forward, rotation
from model_compress.rpq.kernels.config.packed_routes import PackedTile
from model_compress.rpq.kernels.layout import code_bits, pack_codes

torch.manual_seed(0)
BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
worst = 0.0

def check(out, ref, dtype):
    global worst
    assert out.dtype == dtype and out.shape == ref.shape
    worst = max(worst, ((out.double() - ref.double()).norm() / ref.double().norm()).item() / BOUNDS[dtype])

def layer(width, rows, size, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, size, (rows, width), generator=gen), code_bits(size))
    codebooks = torch.randint(-127, 128, (rows, size, 1), generator=gen, dtype=torch.int8)
    return codes, codebooks, torch.rand(rows, generator=gen) / 64 + 1e-3, torch.randn(rows, generator=gen)

width, block = 256, 16
one = PackedTile(1, 8, 256, max_split=2, programs_per_sm=64)
few = PackedTile(16, 32, 64, max_split=4, programs_per_sm=64)
for dtype in (torch.float16, torch.bfloat16):
    for size in (16, 32):
        bits = code_bits(size)
        members = [layer(width, rows, size, seed) for seed, rows in enumerate((96, 32, 40))]
        trio = [(c, b, s.to(dtype)) for c, b, s, _ in members]
        codes, codebooks, scales = trio[0]
        bias = members[0][3].to(dtype)
        joined = torch.cat([m[3].to(dtype) for m in members])
        signs = rotation.random_signs(width, block)
        for tokens in (1, 3, 16) if dtype == torch.float16 else (1,):
            x = torch.randn(tokens, width).to(dtype)
            tile = one if tokens == 1 else few
            plan = packed.nibble_linear_plan(x, codes, codebooks, scales, bias, bits, width, tile, 4)
            group = packed.nibble_group_plan(x, trio, joined, bits, width, tile, 4)
            ref = packed_forward.linear_reference(x.float(), codes, codebooks, scales, bias.float(), bits, width)
            refs = torch.cat([packed_forward.linear_reference(x.float(), c, b, s, m[3].to(dtype).float(), bits, width)
                              for (c, b, s), m in zip(trio, members)], -1)
            for _ in range(2):
                check(plan(x), ref, dtype)
                check(group(x), refs, dtype)
        if dtype == torch.bfloat16:
            continue
        for tokens in (1, 3, 16):
            tile = one if tokens == 1 else few
            x = torch.randn(tokens, width).to(dtype)
            rotated = rotation.rotate(x.double(), signs, block).float()
            ref = packed_forward.linear_reference(rotated, codes, codebooks, scales, bias.float(), bits, width)
            refs = torch.cat([packed_forward.linear_reference(rotated, c, b, s, None, bits, width) for c, b, s in trio], -1)
            for given in (signs, rotation.pack_signs(signs)):
                plan = packed.nibble_linear_plan(x, codes, codebooks, scales, bias, bits, width, tile, 4, rotation=(given, block))
                check(plan(x), ref, dtype)
                check(packed.nibble_group_plan(x, trio, None, bits, width, tile, 4, rotation=(given, block))(x), refs, dtype)
            gate, up = torch.randn(tokens, 2 * width).to(dtype).split([width, width], dim=-1)
            glu = rotation.rotate(F.silu(gate.double()) * up.double(), signs, block).float()
            ref = packed_forward.linear_reference(glu, codes, codebooks, scales, bias.float(), bits, width)
            gated = packed.nibble_linear_plan(gate, codes, codebooks, scales, bias, bits, width, tile, 4,
                                              rotation=(rotation.pack_signs(signs), block), gated=True)
            check(gated(gate, up), ref, dtype)
print("worst", worst)
'''


def test_the_byte_permute_kernels_logic_matches_the_reference_on_the_interpreter():
    worst = interpreted_worst(CHECK)
    assert worst < 1, worst  # the error over its dtype's bound, at most
