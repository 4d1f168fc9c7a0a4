"""The fine-tuning product from packed codes: the decode-and-multiply's outputs and gradients, keeping far less."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from model_compress.rpq.kernels import packed_forward
from model_compress.rpq.kernels.layout import EMBEDDING, LINEAR, decode, pack_codes, unpack_codes
from model_compress.rpq.kernels.trainable_product import trainable_linear, trainable_tied_head


def _problem(layout: str, bits: int, piece: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    books, columns = 6, 512  # LINEAR: out = books * piece, in = columns; EMBEDDING: rows = columns, dim = books * piece
    values = torch.randn(books, 2**bits, piece, generator=gen).requires_grad_()
    codes = torch.randint(0, 2**bits, (books, columns), generator=gen)
    width = columns if layout == EMBEDDING else books * piece
    in_width = books * piece if layout == EMBEDDING else columns
    x = torch.randn(3, 5, in_width, generator=gen).requires_grad_()
    bias = torch.randn(width if layout == LINEAR else columns, generator=gen).requires_grad_()
    return values, codes, pack_codes(codes, bits), x, bias


def _saved_bytes(run):
    kept = []

    def keep(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with saved_tensors_hooks(keep, lambda tensor: tensor):
        out = run()
    return out, sum(kept)


@pytest.mark.parametrize("layout", [LINEAR, EMBEDDING])
@pytest.mark.parametrize("bits,piece", [(4, 1), (5, 1), (3, 2), (8, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_outputs_and_gradients_equal_the_decode_and_multiply(layout, bits, piece, with_bias):
    values, codes, packed, x, bias = _problem(layout, bits, piece)
    bias = bias if with_bias else None
    assert torch.equal(unpack_codes(packed, bits, codes.shape[1]), codes)

    def reference():
        return F.linear(x, decode(values, codes, layout), bias)

    def trained():
        form = trainable_linear if layout == LINEAR else trainable_tied_head
        return form(x, values, packed, bits, codes.shape[1], bias)

    expected, reference_bytes = _saved_bytes(reference)
    got, trained_bytes = _saved_bytes(trained)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(expected)
    wanted = torch.autograd.grad(expected, [t for t in (x, values, bias) if t is not None], upstream)
    given = torch.autograd.grad(got, [t for t in (x, values, bias) if t is not None], upstream)
    for a, b in zip(given, wanted):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the reference keeps int64 codes and W; the product keeps x, the codebook values and the packed codes
    assert trained_bytes < reference_bytes


def test_under_bfloat16_autocast_it_computes_as_autocast_would():
    values, codes, packed, x, bias = _problem(LINEAR, 4, 1, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, decode(values, codes, LINEAR), bias)
        got = trainable_linear(x, values, packed, 4, codes.shape[1], bias)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    upstream = torch.randn_like(expected)
    wanted = torch.autograd.grad(expected, [x, values, bias], upstream)
    given = torch.autograd.grad(got, [x, values, bias], upstream)
    for a, b in zip(given, wanted):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_the_packed_linear_takes_it_only_while_autograd_records(monkeypatch):
    values, codes, packed, x, bias = _problem(LINEAR, 4, 1, seed=2)
    taken = []
    real = packed_forward.trainable_linear
    monkeypatch.setattr(packed_forward, "trainable_linear", lambda *a: taken.append(1) or real(*a))
    with torch.no_grad():
        plain = packed_forward.linear(x, packed, values, None, bias, 4, codes.shape[1])
    assert not taken
    recorded = packed_forward.linear(x, packed, values, None, bias, 4, codes.shape[1])
    assert taken and recorded.requires_grad
    torch.testing.assert_close(recorded.detach(), plain, rtol=1e-5, atol=1e-5)
