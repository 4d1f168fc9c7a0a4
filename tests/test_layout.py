"""The stored layout is rpq-pytorch's: checked by expanding its formula element by element."""

from __future__ import annotations

import pytest
import torch

from model_compress.quantize.layout import EMBEDDING, LINEAR, decode, index_dtype, lookup, to_pieces


def random_codes(num_codebooks, codebook_size, piece, columns, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(num_codebooks, codebook_size, piece, generator=gen)
    indices = torch.randint(0, codebook_size, (num_codebooks, columns), generator=gen, dtype=torch.uint8)
    return codebooks, indices


def test_linear_decode_matches_rpq_pytorch_formula():
    # W[h*D + d, c] = codebooks[h, int(indices[h, c]), d]
    codebooks, indices = random_codes(4, 256, 3, 7)
    weight = decode(codebooks, indices, LINEAR)
    assert weight.shape == (12, 7)
    for h in range(4):
        for d in range(3):
            for c in range(7):
                assert weight[h * 3 + d, c] == codebooks[h, int(indices[h, c]), d]


def test_embedding_decode_matches_rpq_pytorch_formula():
    # E[c, h*D + d] = codebooks[h, int(indices[h, c]), d]
    codebooks, indices = random_codes(3, 256, 5, 11)
    table = decode(codebooks, indices, EMBEDDING)
    assert table.shape == (11, 15)
    for h in range(3):
        for d in range(5):
            for c in range(11):
                assert table[c, h * 5 + d] == codebooks[h, int(indices[h, c]), d]


@pytest.mark.parametrize("layout,shape", [(LINEAR, (12, 7)), (EMBEDDING, (11, 15))])
def test_pieces_are_what_decode_rebuilds(layout, shape):
    """Cutting a weight into pieces, then decoding 'each piece is its own code', gives it back."""
    weight = torch.randn(shape)
    num_codebooks = 3
    pieces = to_pieces(weight, num_codebooks, layout)  # (M, columns, D)
    columns = pieces.shape[1]
    identity_codes = torch.arange(columns).expand(num_codebooks, -1)
    assert torch.equal(decode(pieces, identity_codes, layout), weight)


def test_lookup_gathers_per_codebook():
    codebooks, indices = random_codes(5, 16, 2, 9)
    pieces = lookup(codebooks, indices)
    for h in range(5):
        assert torch.equal(pieces[h], codebooks[h][indices[h].long()])


def test_index_dtype_by_codebook_size():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.uint16
    assert index_dtype(65536) == torch.uint16
    with pytest.raises(ValueError):
        index_dtype(65537)
