"""The tied head's score route (``packed/head_scores.py``: a score table, then a gather-sum over the codes read in
place) on Triton's CPU interpreter, against the decoded table: every code width (the 5-bit planes included), int8
tables with scales and float16 ones, a bias, one token and several. Needs Triton (CI's CPU wheel of torch comes
without it, so this skips there); a child process because ``TRITON_INTERPRET`` must be set before Triton is imported."""

from __future__ import annotations

import pytest

from ..conftest import interpreted_worst

pytest.importorskip("triton", reason="needs Triton (its interpreter)")

CHECK = r'''
import importlib
import torch
from model_compress.rpq.kernels.layout import EMBEDDING, code_bits, codebook_values, decode, pack_codes, unpack_codes

head_scores = importlib.import_module("model_compress.rpq.kernels.packed.head_scores")
torch.manual_seed(0)
worst = 0.0
vocab = 640  # a multiple of 128: 5-bit codes go to the planes
for piece, size, storage in ((2, 128, "int8"), (1, 16, "int8"), (2, 32, "int8"), (4, 256, "float16"), (2, 8, "int8")):
    books, bits = 48 // piece, code_bits(size)
    codes = pack_codes(torch.randint(0, size, (books, vocab)), bits)
    if storage == "int8":
        codebooks = torch.randint(-127, 128, (books, size, piece), dtype=torch.int8)
        scales = torch.rand(books) / 64 + 1e-3
    else:
        codebooks, scales = torch.randn(books, size, piece).half(), None
    table = decode(codebook_values(codebooks, scales, torch.float32), unpack_codes(codes, bits, vocab), EMBEDDING)
    bias = torch.randn(vocab)
    for tokens in (1, 3):
        x = torch.randn(tokens, 48)
        for with_bias in (False, True):
            out = head_scores.scored_head(x, codes, codebooks, scales, bits, vocab, bias if with_bias else None, 128, 16)
            ref = x.double() @ table.double().T + (bias.double() if with_bias else 0)
            assert out.shape == (tokens, vocab) and out.dtype == x.dtype
            worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
print("worst", worst)
'''


def test_the_score_route_of_a_tied_head_gives_the_decoded_tables_logits():
    worst = interpreted_worst(CHECK)
    assert worst < 1e-5, worst
