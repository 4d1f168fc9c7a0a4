"""The packed-code Triton kernels (``kernels/packed``) against the float32 torch reference: every code width the
formats use, D = 1, 2 and 4, int8 and float codebooks, fp16 / bf16 / fp32, odd widths, every token route, the
rotation on and off, and a CUDA graph capture.

CUDA only: CI has no GPU, so these skip there; benchmarks/device/gpu_packed.sh runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from model_compress.rpq.kernels import packed_forward, rotation
from model_compress.rpq.kernels.config.norm_spec import LAYER_NORM, RMS_NORM
from model_compress.rpq.kernels.config import options
from model_compress.rpq.kernels.config.packed_routes import NIBBLE_PROMPT_ROUTES, PACKED_ROUTES, PackedTile
from model_compress.rpq.kernels.layout import EMBEDDING, code_bits, decode, pack_codes, unpack_codes
from model_compress.rpq.layers.modules import RPQEmbedding, RPQLinear, RPQTiedHead

from ..conftest import filled, rel_error, rotated_llama

packed = pytest.importorskip("model_compress.rpq.kernels.packed", reason="needs Triton")
pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
# Relative (Frobenius) error bounds against a float32 reference: output rounding plus fp32 accumulation.
BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
DTYPES = list(BOUNDS)
# (in, out, D, K, codebook storage): the budget's per-row tables at 2-6 bits, vector codes, odd widths, 8 and 16 bits.
FORMATS = [
    (576, 576, 1, 16, "int8"),
    (576, 192, 1, 8, "int8"),
    (1536, 576, 1, 32, "int8"),
    (576, 1536, 1, 4, "float16"),
    (200, 96, 2, 64, "int8"),
    (130, 40, 4, 128, "float16"),
    (100, 72, 1, 256, "int8"),
    (37, 13, 1, 1024, "float16"),
]
TOKENS = [1, 5, 17, 65, 300]  # one token (GEMV), each tensor-core route, decode + cuBLAS
# Tiles beside the routed ones: split-K (the counters must come back to 0: each runs twice), uneven BLOCK_K.
EXTRA_TILES = [PackedTile(1, 16, 64, max_split=8, programs_per_sm=64), PackedTile(16, 32, 32, max_split=3, programs_per_sm=64),
               PackedTile(32, 64, 128, num_warps=8)]


def packed_layer(in_features: int, out_features: int, piece: int, size: int, storage: str, seed: int = 0):
    """Random packed codes, codebooks (int8 with scales, or float) and a bias on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    books = out_features // piece
    codes = pack_codes(torch.randint(0, size, (books, in_features), generator=gen), code_bits(size)).to(CUDA)
    if storage == "int8":
        codebooks = torch.randint(-127, 128, (books, size, piece), generator=gen, dtype=torch.int8).to(CUDA)
        scales = (torch.rand(books, generator=gen) / 64 + 1e-3).to(CUDA)
    else:
        codebooks, scales = torch.randn(books, size, piece, generator=gen).to(CUDA, getattr(torch, storage)), None
    return codes, codebooks, scales, torch.randn(out_features, generator=gen).to(CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FORMATS, ids=lambda s: "x".join(map(str, s)))
def test_packed_linear_every_route_matches_reference(shape, dtype):
    in_features, out_features, piece, size, storage = shape
    codes, codebooks, scales, bias = packed_layer(*shape)
    scales = None if scales is None else scales.to(dtype)
    bits = code_bits(size)
    for tokens in TOKENS:
        x = torch.randn(tokens, in_features, device=CUDA, dtype=dtype)
        ref = packed_forward.linear_reference(x.float(), codes, codebooks, scales, bias.float(), bits, in_features)
        out = packed_forward.linear(x, codes, codebooks, scales, bias.to(dtype), bits, in_features)
        assert out.dtype == dtype and out.shape == ref.shape
        assert rel_error(out, ref) < BOUNDS[dtype], (tokens, "routed")
        tiles = [tile for _, tile in PACKED_ROUTES] + EXTRA_TILES
        for tile in tiles if tokens in (1, 17) and dtype == torch.float16 else []:
            for _ in range(2):
                out = packed.packed_linear(x, codes, codebooks, scales, bias.to(dtype), bits, in_features, tile, 132)
                assert rel_error(out, ref) < BOUNDS[dtype], (tokens, tile.describe())


NIBBLE_TILES = [PackedTile(1, 8, 512), PackedTile(1, 16, 256, max_split=8, programs_per_sm=64), PackedTile(1, 4, 1024, num_warps=8),
                PackedTile(1, 32, 512, num_warps=8, max_split=4, programs_per_sm=16), PackedTile(16, 32, 256),
                PackedTile(16, 64, 128, max_split=8, programs_per_sm=64), PackedTile(64, 64, 128, num_warps=8)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("in_features,out_features", [(576, 576), (4096, 100), (1536, 1000), (32, 7)])
def test_nibble_kernels_match_reference_on_every_tile(in_features, out_features, size, dtype):
    """The byte-permute kernels (4- and 5-bit codes, 16- and 32-entry int8 row tables, fp16 and bf16 tokens): routed and
    on each tile, one token, several and a prompt, split-K included, uneven rows, activations large enough that a
    wrong scaling would overflow fp16."""
    bits = code_bits(size)
    codes, codebooks, row_scales, bias = packed_layer(in_features, out_features, 1, size, "int8", seed=in_features)
    for tokens in (1, 3, 16, 40, 100):  # 100: the prompt route
        for scale in (1.0, 400.0):  # |x| up to ~1600: eight products summed in fp16 stay finite; the outputs too
            x = torch.randn(tokens, in_features, device=CUDA, dtype=dtype) * scale
            scales = (row_scales / scale).to(dtype)
            ref = packed_forward.linear_reference(x.float(), codes, codebooks, scales, bias.float(), bits, in_features)
            assert packed.nibble_serves(x, codes, codebooks, scales, bits, in_features)
            out = packed_forward.linear(x, codes, codebooks, scales, bias.to(dtype), bits, in_features)  # as routed
            assert out.dtype == dtype and torch.isfinite(out).all() and rel_error(out, ref) < BOUNDS[dtype], ("routed", tokens, scale)
            for tile in [t for t in NIBBLE_TILES if (t.block_m == 1) == (tokens == 1)]:
                for _ in range(2):  # the split-K counters come back to 0
                    out = packed.nibble_linear(x, codes, codebooks, scales, bias.to(dtype), bits, in_features, tile, 132)
                    assert rel_error(out, ref) < BOUNDS[dtype], (tile.describe(), tokens, scale)
    no_bias = packed.nibble_linear(x, codes, codebooks, scales, None, bits, in_features, NIBBLE_TILES[-1], 132)
    assert rel_error(no_bias + bias.to(dtype), ref) < BOUNDS[dtype]


PROMPT_TILES = [tile for _, tile in NIBBLE_PROMPT_ROUTES] + [PackedTile(64, 64, 64, num_warps=4), PackedTile(128, 64, 128, num_warps=8, num_stages=2),
                PackedTile(256, 128, 64, num_warps=8)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("in_features,out_features", [(576, 576), (4096, 100), (1536, 1000), (32, 7), (96, 130)])
def test_the_prompt_kernel_matches_the_reference_on_every_tile_and_against_the_decode_route(in_features, out_features, size, dtype):
    """Prompts on tensor cores with W' looked up as the left operand: routed and on each tile, token counts that fill
    and do not fill a tile, a strided view of a wider buffer as x, with and without a bias, activations large enough
    that a wrong scaling would overflow fp16; and the same output as decode + cuBLAS within fp16 rounding."""
    bits = code_bits(size)
    codes, codebooks, row_scales, bias = packed_layer(in_features, out_features, 1, size, "int8", seed=out_features)
    for tokens in (65, 128, 300):
        for scale in (1.0, 400.0):
            wide = torch.randn(tokens, in_features + 32, device=CUDA, dtype=dtype) * scale
            for x in (wide[:, :in_features].contiguous(), wide[:, 32:]):
                scales = (row_scales / scale).to(dtype)
                ref = packed_forward.linear_reference(x.float(), codes, codebooks, scales, bias.float(), bits, in_features)
                assert packed.nibble_prompt_serves(x, codes, codebooks, scales, bits, in_features)
                for fused in (True, False):
                    with options.using(fused_prompts=fused):
                        out = packed_forward.linear(x, codes, codebooks, scales, bias.to(dtype), bits, in_features)
                    assert out.dtype == dtype and torch.isfinite(out).all() and rel_error(out, ref) < BOUNDS[dtype], (fused, tokens, scale)
                for tile in PROMPT_TILES:
                    for with_bias in (True, False):
                        plan = packed.nibble_prompt_plan(x, codes, codebooks, scales, bias.to(dtype) if with_bias else None, bits,
                                                         in_features, tile)
                        for _ in range(2):  # the second call is a kept plan's direct launch
                            out = plan(x)
                            expected = ref if with_bias else ref - bias.float()
                            assert rel_error(out, expected) < BOUNDS[dtype], (tile.describe(), tokens, scale, with_bias)


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nibble_decoded_weight_is_the_reference_weight(dtype, size):
    codes, codebooks, scales, _ = packed_layer(544, 100, 1, size, "int8")
    weight = packed.nibble_decode_weight(codes, codebooks, scales.to(dtype), code_bits(size), 544, dtype)
    ref = decode(packed_forward.codebook_values(codebooks, scales.to(dtype), torch.float32),
                 unpack_codes(codes, code_bits(size), 544), "linear")
    assert weight.dtype == dtype and weight.shape == (100, 544)
    assert rel_error(weight, ref) < BOUNDS[dtype]


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("outs,with_bias", [((576, 192, 192), False), ((1536, 1536), True), ((100, 37, 64), True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_nibble_group_gemv_gives_each_member_its_reference_output(outs, with_bias, size, dtype):
    """Two or three layers on the same tokens in one launch (q/k/v, gate/up): each output its layer's, split-K
    included, at one token (the GEMV) and at 3, 16 and 64 tokens (tensor cores), token rows strided too."""
    bits, in_features = code_bits(size), 576
    layers = [packed_layer(in_features, out, 1, size, "int8", seed=i) for i, out in enumerate(outs)]
    members = [(codes, codebooks, scales.to(dtype)) for codes, codebooks, scales, _ in layers]
    bias = torch.cat([b.to(dtype) for *_, b in layers]) if with_bias else None
    for tokens in (1, 3, 16, 64):
        wide = torch.randn(tokens, in_features + 64, device=CUDA, dtype=dtype)
        for x in (wide[:, :in_features].contiguous(), wide[:, :in_features]) if tokens > 1 else (wide[:, :in_features].contiguous(),):
            refs = [packed_forward.linear_reference(x.float(), c, b, s, layer[3].float() if with_bias else None, bits, in_features)
                    for (c, b, s), layer in zip(members, layers)]
            for tile in [t for t in NIBBLE_TILES if (t.block_m == 1) == (tokens == 1)]:
                for _ in range(2):  # the split-K counters come back to 0
                    outputs = packed.nibble_group_gemv(x, members, bias, bits, in_features, tile, 132)
                    assert [o.shape for o in outputs] == [(tokens, out) for out in outs]
                    for out, ref in zip(outputs, refs):
                        assert out.dtype == dtype and rel_error(out, ref) < BOUNDS[dtype], (tokens, tile.describe())


@pytest.mark.parametrize("tokens", [1, 3, 80])
def test_the_joined_group_op_gives_each_member_its_output_side_by_side(tokens):
    """What a compiled graph calls for siblings: one launch up to 64 tokens, each member alone for a longer prompt."""
    from model_compress.rpq.kernels import packed_ops

    layers = [packed_layer(576, out, 1, 16, "int8", seed=i) for i, out in enumerate((576, 192, 192))]
    x = torch.randn(tokens, 576, device=CUDA, dtype=torch.float16)
    members = [(codes, codebooks, scales.half()) for codes, codebooks, scales, _ in layers]
    joined = packed_ops.linear_group(x, *[list(parts) for parts in zip(*members)], 4, 576)
    refs = [packed_forward.linear_reference(x.float(), c, b, s, None, 4, 576) for c, b, s in members]
    assert joined.shape == (tokens, 960)
    assert rel_error(joined, torch.cat(refs, -1)) < BOUNDS[torch.float16]


def test_a_model_with_grouped_siblings_on_cuda_gives_the_logits_it_gives_without(monkeypatch):
    model = rotated_llama().to(CUDA, torch.float16)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device=CUDA)
    with torch.no_grad():
        alone = model(ids).logits.float()
        from model_compress.rpq.fusions import apply_fusions

        apply_fusions(model)
        monkeypatch.setattr(packed_forward, "NIBBLE_GROUPS", True)
        calls = []  # each group's launch is planned once (kernels/plans.py), then kept
        original = packed.nibble_group_plan
        monkeypatch.setattr(packed, "nibble_group_plan", lambda *a, **k: calls.append(1) or original(*a, **k))
        grouped = model(ids).logits.float()
    assert len(calls) == 2 * len(model.model.layers)
    assert rel_error(grouped, alone) < 1e-2


def test_nibble_kernels_decline_what_they_cannot_read():
    """A misaligned token, float32, widths off whole 16-byte code vectors, 3- and 6-bit codes: the general kernels serve them."""
    codes, codebooks, scales, bias = packed_layer(576, 64, 1, 16, "int8")
    x = torch.randn(1, 577, device=CUDA, dtype=torch.float16)
    assert not packed.nibble_serves(x[:, 1:], codes, codebooks, scales, 4, 576)
    assert not packed.nibble_serves(x[:, :576].float(), codes, codebooks, scales, 4, 576)
    odd = packed_layer(200, 64, 1, 16, "int8")
    assert not packed.nibble_serves(torch.randn(1, 200, device=CUDA, dtype=torch.float16), odd[0], odd[1], odd[2], 4, 200)
    for size in (8, 64):
        other = packed_layer(576, 64, 1, size, "int8")
        assert not packed.nibble_serves(x[:, :576], other[0], other[1], other[2], code_bits(size), 576)
    shifted = x[:, 1:]
    ref = packed_forward.linear_reference(shifted.float(), codes, codebooks, scales, bias.float(), 4, 576)
    out = packed_forward.linear(shifted, codes, codebooks, scales, bias.half(), 4, 576)
    assert rel_error(out, ref) < BOUNDS[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoded_weight_is_the_reference_weight(dtype):
    codes, codebooks, scales, _ = packed_layer(200, 96, 2, 64, "int8")
    weight = packed.decode_linear_weight(codes, codebooks, scales, 6, 200, dtype)
    ref = decode(packed_forward.codebook_values(codebooks, scales, torch.float32), unpack_codes(codes, 6, 200), "linear")
    assert rel_error(weight, ref) < BOUNDS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [16, 64, 128])
def test_rotation_kernel_matches_the_torch_rotation(dtype, block):
    """With the signs as int8 +-1 and as the bits a layer stores (what a compiled model hands over)."""
    signs = rotation.random_signs(256, 3).to(CUDA)
    for given in (signs, rotation.pack_signs(signs)):
        for tokens in (1, 7, 40):
            x = torch.randn(tokens, 256, device=CUDA, dtype=dtype)
            assert rel_error(packed.rotate(x, given, block), rotation.rotate(x.double(), signs, block)) < BOUNDS[dtype]
            assert rel_error(packed.unrotate(x, given, block), rotation.unrotate(x.double(), signs, block)) < BOUNDS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotated", [False, True])
def test_rpq_modules_on_packed_kernels_match_their_dense_weights(dtype, rotated):
    block = 64 if rotated else None
    linear = filled(RPQLinear(576, 192, 192, 16, codebook_dtype="int8", rotation_block=block))
    table = filled(RPQEmbedding(1000, 576, 288, 128, codebook_dtype="int8", rotation_block=block))
    if rotated:
        linear.set_signs(rotation.random_signs(576, 1))
        table.set_signs(rotation.random_signs(576, 2))
    head = RPQTiedHead(table)
    linear, table, head = (m.to(CUDA, dtype) for m in (linear, table, head))
    assert not linear.native and not table.native
    dense_linear, dense_table = linear.dequantize().double(), table.dequantize().double()
    for tokens in (1, 3, 16, 40, 300):
        x = torch.randn(tokens, 576, device=CUDA, dtype=dtype)
        assert rel_error(linear(x), x.double() @ dense_linear.T + linear.bias.double()) < BOUNDS[dtype], tokens
        assert rel_error(head(x), x.double() @ dense_table.T) < BOUNDS[dtype], tokens
        ids = torch.randint(0, 1000, (2, tokens), device=CUDA)
        assert rel_error(table(ids), dense_table[ids]) < BOUNDS[dtype], tokens


def test_packed_head_reads_the_codes_at_every_width():
    for size in (4, 8, 32, 128, 1024):
        bits = code_bits(size)
        codes, codebooks, scales, _ = packed_layer(777, 64, 2, size, "int8", seed=size)  # 777 rows of a 64-wide table
        values = packed_forward.codebook_values(codebooks, scales, torch.float32)
        table = decode(values, unpack_codes(codes, bits, 777), EMBEDDING)
        x = torch.randn(5, 64, device=CUDA)
        assert rel_error(packed.packed_head(x, codes, codebooks, scales, bits, 777, None), x @ table.T) < 1e-5, size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("piece,size,storage", [(1, 16, "int8"), (2, 128, "int8"), (4, 256, "float16"), (2, 32, "int8")])
def test_packed_head_matches_decoded_table(piece, size, storage, dtype):
    """Every piece length, int8 and 16-bit codebooks, a width that is not a whole number of codebook steps (200 / D),
    a vocabulary that is not a whole number of blocks, and the token counts that take this route, with a bias."""
    bits = code_bits(size)
    codes, codebooks, scales, _ = packed_layer(1001, 200, piece, size, storage, seed=piece * size)
    bias = torch.randn(1001, device=CUDA, dtype=dtype)
    scales = None if scales is None else scales.to(dtype)
    values = packed_forward.codebook_values(codebooks, scales, torch.float32)
    table = decode(values, unpack_codes(codes, bits, 1001), EMBEDDING).double()
    for tokens in (1, 3, 16):
        x = torch.randn(2, tokens, 200, device=CUDA, dtype=dtype)
        out = packed.packed_head(x, codes, codebooks, scales, bits, 1001, bias)
        ref = x.double() @ table.T + bias.double()
        assert out.shape == (2, tokens, 1001) and out.dtype == dtype
        assert rel_error(out, ref) < BOUNDS[dtype], tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("piece,size,storage", [(1, 16, "int8"), (2, 128, "int8"), (4, 256, "float16"), (2, 32, "int8")])
def test_the_score_route_of_a_tied_head_matches_the_decoded_table(piece, size, storage, dtype, monkeypatch):
    """The score table and gather-sum (``packed/head_scores.py``), called and through the tied head's route."""
    bits = code_bits(size)
    codes, codebooks, scales, _ = packed_layer(1001, 200, piece, size, storage, seed=piece * size)
    bias = torch.randn(1001, device=CUDA, dtype=dtype)
    scales = None if scales is None else scales.to(dtype)
    table = decode(packed_forward.codebook_values(codebooks, scales, torch.float32), unpack_codes(codes, bits, 1001),
                   EMBEDDING).double()
    monkeypatch.setattr(packed_forward, "HEAD_SCORE_TOKENS", 4)
    for tokens in (1, 3):
        x = torch.randn(2, tokens, 200, device=CUDA, dtype=dtype)
        ref = x.double() @ table.T + bias.double()
        for out in (packed.scored_head(x, codes, codebooks, scales, bits, 1001, bias),
                    packed_forward.tied_head(x[:1], codes, codebooks, scales, bias, bits, 1001)):
            assert out.dtype == dtype and out.shape[-1] == 1001
            assert rel_error(out, ref[: out.shape[0]]) < BOUNDS[dtype], tokens


def test_packed_linear_replays_in_a_cuda_graph():
    layer = filled(RPQLinear(576, 1536, 1536, 16, codebook_dtype="int8", rotation_block=64)).to(CUDA, torch.float16)
    layer.set_signs(rotation.random_signs(576, 4))
    x = torch.randn(1, 576, device=CUDA, dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    ref = x.double() @ layer.dequantize().double().T + layer.bias.double()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = x.double() @ layer.dequantize().double().T + layer.bias.double()
        assert rel_error(out, ref) < BOUNDS[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,block", [(576, 64), (1536, 64), (896, 128), (4096, 128)])
def test_norm_and_gate_prologues_write_the_rotated_input(dtype, width, block):
    gen = torch.Generator().manual_seed(width)
    signs = rotation.random_signs(width, block).to(CUDA)
    weight, bias = (torch.randn(width, generator=gen).to(CUDA, dtype) for _ in range(2))
    for tokens in (1, 7, 33):
        x, up = (torch.randn(tokens, width, generator=gen).to(CUDA, dtype) for _ in range(2))
        rms = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
        layer = torch.nn.functional.layer_norm(x.double(), (width,), weight.double(), bias.double(), 1e-5)
        glu = torch.nn.functional.silu(x.double()) * up.double()
        bits = rotation.pack_signs(signs)  # the stored form, read as it is
        cases = [
            (packed.norm_rotate(x, weight, None, 1e-5, RMS_NORM, signs, block), rms),
            (packed.norm_rotate(x, weight, bias, 1e-5, LAYER_NORM, bits, block), layer),
            (packed.gated_silu_rotate(x, up, signs, block), glu),
            (packed.gated_silu_rotate(x, up, bits, block), glu),
        ]
        for out, ref in cases:
            assert out.dtype == dtype
            assert rel_error(out, rotation.rotate(ref, signs, block)) < BOUNDS[dtype], tokens


def test_a_rotated_model_with_its_fusions_on_cuda_gives_the_cpu_logits():
    from model_compress.rpq.fusions import apply_fusions

    model = rotated_llama()
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = model(ids).logits
        model.to(CUDA)
        for tokens in (1, 5, 40):
            assert rel_error(model(ids[:, :tokens].to(CUDA)).logits.cpu(), expected[:, :tokens]) < 1e-4, tokens


def test_a_direct_launch_skips_the_jit_after_its_first_call_and_computes_the_same():
    from model_compress.rpq.kernels.packed.rotate import _rotate_kernel, _sign_matrix
    from model_compress.rpq.kernels.launch.direct_launch import DirectLaunch

    signs = rotation.random_signs(256, 3).to(CUDA)
    hadamard = _sign_matrix(64, CUDA, torch.float16)
    launch = DirectLaunch(_rotate_kernel, (1, 4), BLOCK=64, BLOCK_T=16, SIGNS_FIRST=True, DOT_IEEE=False, PACKED_SIGNS=False)
    for call in range(3):
        x = torch.randn(16, 256, device=CUDA, dtype=torch.float16)
        out = torch.empty_like(x)
        launch(x, signs, hadamard, out, 16, 256, 256, 64**-0.5)
        assert launch.direct, call  # known after the first call: this Triton's compiled kernel launches directly
        assert rel_error(out, rotation.rotate(x.double(), signs, 64)) < BOUNDS[torch.float16], call


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kept_plans_decode_the_same_logits_call_after_call_and_in_a_cuda_graph(dtype):
    """The layers' kept plans (the first call through Triton's JIT, later ones past it) against the CPU's logits, at
    the token counts of each route, and a captured one-token step replayed on new ids."""
    from model_compress.rpq.fusions import apply_fusions

    model = rotated_llama()
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    bound = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        expected = model(ids).logits
        model.to(CUDA, dtype)
        for tokens in (1, 5, 40):
            calls = [model(ids[:, :tokens].to(CUDA)).logits for _ in range(3)]
            assert rel_error(calls[0].float().cpu(), expected[:, :tokens]) < bound, tokens
            for later in calls[1:]:
                assert torch.equal(later, calls[0]), tokens
        step = ids[:, :1].to(CUDA)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(step, output_hidden_states=True)
        for token in (3, 17):
            step.fill_(token)
            graph.replay()
            torch.cuda.synchronize()
            eager = model(step, output_hidden_states=True)
            # the last hidden state first: the packed layers' work, before the dense head's cuBLAS call
            assert torch.equal(captured.hidden_states[-1], eager.hidden_states[-1]), ("hidden state", token)
            assert torch.equal(captured.logits, eager.logits), ("logits", token)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_programmatic_launch_changes_no_logit_eager_or_in_a_cuda_graph(dtype):
    """Kernels launched as programmatic dependents read a layer's weights before the kernel ahead of them ends and wait
    for it before reading its output: the logits equal those of plain launches bit for bit, eager at every route and
    replayed from CUDA graphs on new ids (an input read too early would show as the previous step's value)."""
    from model_compress.rpq.fusions import apply_fusions

    if not packed.programmatic_launch_supported(CUDA):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    model = rotated_llama()
    apply_fusions(model)
    model.to(CUDA, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), device=CUDA)
    with torch.no_grad():
        for tokens in (1, 5, 40):
            with options.using(programmatic_launch=False):
                plain = model(ids[:, :tokens]).logits
            with options.using(programmatic_launch=True):
                early = model(ids[:, :tokens]).logits
            assert torch.equal(early, plain), tokens
        step = ids[:, :1].clone()
        captured = {}
        for early in (False, True):
            with options.using(programmatic_launch=early):
                model(step)  # the plans of this option, made outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = model(step).logits
            captured[early] = graph, logits
        for token in (3, 17, 101):
            step.fill_(token)
            for graph, _ in captured.values():
                graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured[True][1], captured[False][1]), token
            with options.using(programmatic_launch=True):
                assert torch.equal(model(step).logits, captured[True][1]), token


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("in_features,block", [(576, 64), (1536, 64), (2048, 16), (4096, 32)])
def test_kernels_that_rotate_as_they_load_give_the_rotate_then_multiply_values(in_features, block, size, dtype):
    """x R made in the kernels' load (one token, a few, the sibling launch) equals the rotation kernel's x R fed to the
    same kernel bit for bit, signs as stored bits or +-1 values, split-K included; and the reference within bounds."""
    bits = code_bits(size)
    layers = [packed_layer(in_features, out, 1, size, "int8", seed=i) for i, out in enumerate((576, 192))]
    members = [(codes, codebooks, scales.to(dtype)) for codes, codebooks, scales, _ in layers]
    signs = rotation.random_signs(in_features, block).to(CUDA)
    codes, codebooks, scales = members[0]
    bias = layers[0][3].to(dtype)
    for tokens in (1, 3, 16, 64):
        x = torch.randn(tokens, in_features, device=CUDA, dtype=dtype)
        rotated = packed.rotate(x, signs, block)
        for tile in [t for t in NIBBLE_TILES if (t.block_m == 1) == (tokens == 1) and packed.rotates_in_load(block, t)]:
            for given in (signs, rotation.pack_signs(signs)):
                out = packed.nibble_linear(x, codes, codebooks, scales, bias, bits, in_features, tile, 132, rotation=(given, block))
                assert torch.equal(out, packed.nibble_linear(rotated, codes, codebooks, scales, bias, bits, in_features, tile, 132))
                ref = packed_forward.linear_reference(rotated.float(), codes, codebooks, scales, bias.float(), bits, in_features)
                assert rel_error(out, ref) < BOUNDS[dtype], (tokens, tile.describe())
                joined = packed.nibble_group_gemv(x, members, None, bits, in_features, tile, 132, rotation=(given, block))
                alone = packed.nibble_group_gemv(rotated, members, None, bits, in_features, tile, 132)
                assert all(torch.equal(a, b) for a, b in zip(joined, alone)), (tokens, tile.describe())


def test_a_rotated_layer_at_one_token_rotates_in_its_kernel_and_computes_what_two_launches_compute():
    layer = filled(RPQLinear(576, 576, 576, 16, codebook_dtype="int8", rotation_block=64)).to(CUDA, torch.float16)
    layer.set_signs(rotation.random_signs(576, 9))
    x = torch.randn(1, 1, 576, device=CUDA, dtype=torch.float16)
    with torch.no_grad():
        plan = packed_forward.rotating_linear_plan(x, layer.indices, layer.codebooks, layer.codebook_scales, layer.bias,
                                                   layer.code_bits, 576, layer.rotation_signs, 64)
        assert plan is not None
        for _ in range(2):  # the per-call path, then the kept plan
            assert torch.equal(layer(x), layer.forward_rotated(layer.rotate_alone(x)))
    assert rel_error(layer(x).detach(), x.double() @ layer.dequantize().double().T + layer.bias.double()) < BOUNDS[torch.float16]


def test_siblings_behind_an_unfused_norm_rotate_in_their_launch_on_cuda(monkeypatch):
    """Without the fused norm q/k/v and gate/up get x before the rotation: at one token their one launch rotates it as
    it loads it, and the logits are those of the fused model (its prologue writes the same x R, up to the norm's
    own rounding)."""
    from model_compress.rpq.fusions import apply_fusions

    fused, unfused = rotated_llama(), rotated_llama()
    unfused.load_state_dict(fused.state_dict())
    apply_fusions(fused)
    with options.using(fused_norm=False):
        apply_fusions(unfused)
    fused.to(CUDA, torch.float16)
    unfused.to(CUDA, torch.float16)
    rotations = []
    original = packed.nibble_group_plan
    monkeypatch.setattr(packed, "nibble_group_plan", lambda *a, **k: rotations.append(a[-1] if len(a) > 8 else k.get("rotation"))
                        or original(*a, **k))
    ids = torch.randint(0, fused.config.vocab_size, (1, 1), device=CUDA)
    with torch.no_grad():
        expected = fused(ids).logits.float()
        rotations.clear()
        got = unfused(ids).logits.float()
    assert len(rotations) == 2 * len(unfused.model.layers) and all(r is not None for r in rotations)
    assert rel_error(got, expected) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("width,block", [(1536, 64), (4096, 32)])
def test_down_proj_that_forms_its_gated_input_in_its_load_gives_the_prologue_then_multiply_values(width, block, dtype):
    """(silu(gate) * up) R made in down_proj's own launch (one token, a few) equals the SiLU prologue's output fed to
    the same kernel, bit for bit; gate and up as the sibling launch hands them over (views of one joined tensor)."""
    codes, codebooks, scales, bias = packed_layer(width, 576, 1, 16, "int8", seed=width)
    scales, bias = scales.to(dtype), bias.to(dtype)
    signs = rotation.pack_signs(rotation.random_signs(width, block).to(CUDA))
    for tokens in (1, 5, 16):
        joined = torch.randn(1, tokens, 2 * width, device=CUDA, dtype=dtype)
        gate, up = joined.split([width, width], dim=-1)
        fused = packed_forward.gated_rotating_linear_plan(gate, up, codes, codebooks, scales, bias, 4, width, signs, block)
        assert fused is not None
        product = packed.gated_silu_rotate(gate, up, signs, block)
        two_launches = packed_forward.linear(product, codes, codebooks, scales, bias, 4, width)
        for _ in range(2):
            assert torch.equal(fused(gate, up), two_launches), tokens
        glu = torch.nn.functional.silu(gate.double()) * up.double()
        ref = packed_forward.linear_reference(rotation.rotate(glu, rotation.unpack_signs(signs), block).float(), codes, codebooks,
                                              scales, bias.float(), 4, width)
        assert rel_error(two_launches, ref) < BOUNDS[dtype], tokens
