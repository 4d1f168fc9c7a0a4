"""The head index's scores through the packed head kernel (8-bit codes, float32 sums written unrounded), on Triton's
CPU interpreter, against the index's torch reference. Needs Triton (CI's CPU wheel of torch comes without it, so
this skips there); runs in a child process because ``TRITON_INTERPRET`` must be set before Triton is imported."""

from __future__ import annotations

import pytest

from ..conftest import interpreted_worst

pytest.importorskip("triton", reason="needs Triton (its interpreter)")

CHECK = r'''
import torch
from model_compress.rpq.head_index.index import build_index
from model_compress.rpq.kernels import packed

torch.manual_seed(0)
index = build_index(torch.randn(700, 64), subspaces=32, centroids=256, hidden_states=torch.randn(500, 64))
worst = 0.0
for tokens in (1, 3):
    x = torch.randn(tokens, 64)
    scores = packed.packed_head(x, index.codes, index.centroids, None, 8, index.vocab, None, out_dtype=torch.float32)
    assert scores.dtype == torch.float32
    reference = index.reference_scores(x).double()
    worst = max(worst, ((scores.double() - reference).abs().max() / reference.abs().max()).item())
    bias = torch.randn(index.vocab)  # the upper bounds: scores, bias and each row's error bound in the epilogue
    for metric in (False, True):
        token_scale, metric_scale = index._bound_scales(x)
        bounds = packed.RowBounds(token_scale, index.row_error, metric_scale if metric else None,
                                  index.metric_error if metric else None)
        upper = packed.packed_head(x, index.codes, index.centroids, None, 8, index.vocab, bias, out_dtype=torch.float32,
                                   bounds=bounds)
        plain = token_scale[:, None] * index.row_error[None]
        expected = reference + bias.double() + (index.error_bounds(x) if metric else plain).double()
        worst = max(worst, ((upper.double() - expected).abs().max() / expected.abs().max()).item())
print("worst", worst)
'''


def test_the_index_scores_and_upper_bounds_through_the_packed_head_kernel_equal_the_torch_reference():
    worst = interpreted_worst(CHECK)
    assert worst < 1e-5, worst
