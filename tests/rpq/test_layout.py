"""The stored layout is rpq-pytorch's: checked by expanding its formula element by element."""

from __future__ import annotations

import pytest
import torch

from model_compress.rpq.kernels.layout import EMBEDDING, LINEAR, code_bits, decode, lookup, pack_codes, to_pieces, unpack_codes


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


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("columns", [1, 7, 37, 256])
def test_packed_codes_round_trip_at_every_bit_width(bits, columns):
    gen = torch.Generator().manual_seed(bits * 1000 + columns)
    codes = torch.randint(0, 2**bits, (5, columns), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-columns * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, columns), codes)
    picked = torch.randint(0, columns, (3, 4), generator=gen)
    assert torch.equal(unpack_codes(packed, bits, columns, picked), codes[:, picked.reshape(-1)])


@pytest.mark.parametrize("bits", [3, 4, 5, 7])
def test_packing_a_slice_of_rows_at_a_time_gives_the_same_bytes(bits, monkeypatch):
    from model_compress.rpq.kernels import layout

    codes = torch.randint(0, 2**bits, (23, 300), generator=torch.Generator().manual_seed(bits))
    whole = pack_codes(codes, bits)
    monkeypatch.setattr(layout, "PACK_CHUNK_BYTES", 3 * 4 * 8 * layout.packed_width(300, bits))  # 3 rows a slice
    assert torch.equal(pack_codes(codes, bits), whole)
    assert torch.equal(unpack_codes(whole, bits, 300), codes)


def test_eight_bit_codes_are_the_rpq_pytorch_bytes():
    codes = torch.randint(0, 256, (4, 33))
    assert torch.equal(pack_codes(codes, 8), codes.to(torch.uint8))


def test_packing_is_little_endian_along_the_columns():
    codes = torch.tensor([[1, 2, 3, 0, 3]])  # 2 bits each: bits 0-1, 2-3, 4-5, 6-7, then byte 2
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]


def test_code_bits_by_codebook_size():
    assert [code_bits(k) for k in (2, 3, 4, 5, 255, 256, 257, 65536)] == [1, 2, 2, 3, 8, 8, 9, 16]
    with pytest.raises(ValueError):
        code_bits(65537)


@pytest.mark.parametrize("shape,layout", [((576, 576), "linear"), ((192, 576), "linear"), ((576, 1536), "linear"),
                                          ((4096, 11008), "linear"), ((49152, 576), "embedding"), ((384, 30522), "linear")])
def test_every_format_a_budget_offers_has_a_packed_kernel(shape, layout):
    from model_compress.rpq.fit.formats import budget_candidates
    from model_compress.rpq.kernels.config.packed_routes import serves

    candidates = budget_candidates(shape, layout, ("int8", "float16"), 1.0, 9.0)
    assert candidates
    assert all(serves(code_bits(f.codebook_size)) and f.codebook_dtype in ("int8", "float16") for f in candidates)


def test_prompts_take_the_one_launch_kernel_up_to_its_bounds_and_decode_for_cublas_beyond():
    """The prompt route's rule (config/packed_routes.py): the one-launch prompt kernel up to NIBBLE_PROMPT_MAX_TOKENS
    tokens whatever the layer, beyond that only while the layer's product is small; each tile covers its bucket."""
    from model_compress.rpq.kernels.config.packed_routes import (NIBBLE_PROMPT_MAX_MACS, NIBBLE_PROMPT_MAX_TOKENS,
                                                                 NIBBLE_PROMPT_ROUTES, nibble_prompt_tile)

    assert nibble_prompt_tile(65, 4096, 11008) == NIBBLE_PROMPT_ROUTES[0][1]
    assert nibble_prompt_tile(NIBBLE_PROMPT_MAX_TOKENS, 11008, 4096) == NIBBLE_PROMPT_ROUTES[1][1]
    assert nibble_prompt_tile(NIBBLE_PROMPT_MAX_TOKENS + 1, 4096, 11008) is None  # a 7B-class layer: decode + cuBLAS
    assert nibble_prompt_tile(2048, 576, 1536) is not None  # SmolLM2's MLP at 2,048 tokens: 1.8e9 multiply-adds
    assert 2048 * 576 * 1536 <= NIBBLE_PROMPT_MAX_MACS < 4096 * 4096 * 2048
    assert nibble_prompt_tile(8192, 576, 1536) is None


def test_the_kernels_rotate_in_their_load_for_the_default_block_and_not_for_blocks_too_wide_for_a_step():
    """A step's slice must hold 16 or more Hadamard blocks (tensor cores): 64 (the default) and 16 fit every byte-permute
    route, 128 not the one-token one (1,024 inputs a step: 8 blocks); other formats never rotate in their load."""
    from model_compress.rpq.kernels.config.packed_routes import NIBBLE_ROUTES, layer_rotates_in_load, rotates_in_load

    assert all(rotates_in_load(64, tile) and rotates_in_load(16, tile) for _, tile in NIBBLE_ROUTES)
    assert not rotates_in_load(128, NIBBLE_ROUTES[0][1])
    assert layer_rotates_in_load(1, 16, "int8", 576, 64) and layer_rotates_in_load(1, 32, "int8", 1536, 64)
    assert not layer_rotates_in_load(1, 16, "int8", 576, 128) and not layer_rotates_in_load(1, 16, "int8", 576, None)
    assert not layer_rotates_in_load(2, 256, "int8", 576, 64) and not layer_rotates_in_load(1, 8, "int8", 576, 64)
