"""The packed kernels' plans (argument lists, grids, strides, constants) run on Triton's CPU interpreter against float64
references: x R and y R^T, the norm and SiLU prologues (gate and up as strided views of one buffer, as a sibling group
hands them over), the general GEMV and tensor-core routes with split-K, the decode routes (a Linear's W', embedding
rows by id, a head's chunk). Each plan is called twice: the second call is the one a kept plan makes. The byte-permute
kernels' lookups are inline PTX, which the interpreter cannot run: ``test_nibble_interpreted.py`` runs the code around
them with a stand-in, and ``test_packed_kernels.py`` checks them on a GPU.

Needs Triton (the CPU wheel of torch comes without it, so CI skips this file); runs in a child process because
``TRITON_INTERPRET`` must be set before Triton is imported.
"""

from __future__ import annotations

import pytest

from ..conftest import interpreted_worst

pytest.importorskip("triton", reason="needs Triton (its interpreter)")

CHECKS = r'''
import torch
from model_compress.rpq.kernels import packed, packed_forward, rotation
from model_compress.rpq.kernels.config.norm_spec import LAYER_NORM, RMS_NORM
from model_compress.rpq.kernels.config.packed_routes import PackedTile, packed_tile
from model_compress.rpq.kernels.layout import EMBEDDING, LINEAR, code_bits, decode, pack_codes, unpack_codes

torch.manual_seed(0)
worst = 0.0

def check(out, ref):
    global worst
    worst = max(worst, ((out.double() - ref.double()).norm() / ref.double().norm()).item())

signs = rotation.random_signs(128, 3)
for tokens in (1, 7):
    x = torch.randn(tokens, 128)
    for first in (True, False):
        plan = packed.rotate_plan(x, signs, 32, signs_first=first)
        ref = (rotation.rotate if first else rotation.unrotate)(x.double(), signs, 32)
        for _ in range(2):
            check(plan(x), ref)
weight, bias = torch.randn(128), torch.randn(128)
for tokens in (1, 5):
    x = torch.randn(tokens, 128)
    rms = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    layer = torch.nn.functional.layer_norm(x.double(), (128,), weight.double(), bias.double(), 1e-5)
    for kind, b, ref in ((RMS_NORM, None, rms), (LAYER_NORM, bias, layer)):
        plan = packed.norm_rotate_plan(x, weight, b, 1e-5, kind, signs, 32)
        for _ in range(2):
            check(plan(x, None), rotation.rotate(ref, signs, 32))
    both = torch.randn(tokens, 256)
    gate, up = both[:, :128], both[:, 128:]
    plan = packed.gated_silu_rotate_plan(gate, up, signs, 32)
    for _ in range(2):
        check(plan(gate, up), rotation.rotate(torch.nn.functional.silu(gate.double()) * up.double(), signs, 32))
split = PackedTile(1, 16, 32, max_split=3, programs_per_sm=64)
for size, piece in ((8, 1), (64, 2)):
    bits, inputs, outputs = code_bits(size), 96, 48
    books = outputs // piece
    codes = pack_codes(torch.randint(0, size, (books, inputs)), bits)
    codebooks = torch.randint(-127, 128, (books, size, piece), dtype=torch.int8)
    scales = torch.rand(books) / 64
    bias_out = torch.randn(outputs)
    values = packed_forward.codebook_values(codebooks, scales, torch.float32)
    dense = decode(values, unpack_codes(codes, bits, inputs), LINEAR).double()
    for tokens, tile in ((1, packed_tile(1)), (1, split), (5, packed_tile(5)), (20, packed_tile(20))):
        x = torch.randn(tokens, inputs)
        plan = packed.packed_linear_plan(x, codes, codebooks, scales, bias_out, bits, inputs, tile, 4)
        for _ in range(2):
            check(plan(x), x.double() @ dense.T + bias_out.double())
    check(packed.decode_linear_plan(codes, codebooks, scales, bits, inputs, torch.float32)(), dense)
    table = pack_codes(torch.randint(0, size, (books, 300)), bits)
    rows = decode(values, unpack_codes(table, bits, 300), EMBEDDING).double()
    ids = torch.randint(0, 300, (6,))
    picked = torch.empty(6, outputs)
    packed.decode_plan(table, codebooks, scales, bits, 300, outputs, 1, 6, has_ids=True)(picked, ids)
    check(picked, rows[ids])
    chunk = torch.empty(100, outputs)
    packed.decode_plan(table, codebooks, scales, bits, 300, outputs, 1, 100, first_column=64)(chunk, None)
    check(chunk, rows[64:164])
print("worst", worst)
'''


def test_plans_on_the_interpreter_match_float64_references():
    worst = interpreted_worst(CHECKS)
    assert worst < 1e-6, worst
