"""Every forward path of the RPQ modules equals the plain PyTorch reference on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_compress.rpq.kernels.config import options
from model_compress.rpq.kernels import forward as kernels
from model_compress.rpq.layers.modules import RPQEmbedding, RPQLinear, RPQTiedHead, build_rpq_embedding
from model_compress.rpq.kernels.layout import pack_codes, packed_width

from ..conftest import filled, rel_error


@pytest.mark.parametrize(
    "in_features,out_features,num_codebooks,codebook_size",
    [(96, 64, 8, 256), (37, 30, 5, 16), (128, 48, 48, 300), (40, 24, 24, 5), (33, 16, 8, 2), (50, 12, 6, 40000)],
)
@pytest.mark.parametrize("codebook_dtype", [None, "int8"])
@pytest.mark.parametrize("tokens", [1, 3, 16, 40, 200])
def test_linear_forward_matches_f_linear(in_features, out_features, num_codebooks, codebook_size, codebook_dtype, tokens):
    """Every layout (D from 1 up, K from 2 to 65,536 packed at ceil(log2 K) bits, float or int8 codebooks)."""
    layer = filled(RPQLinear(in_features, out_features, num_codebooks, codebook_size, bias=True, codebook_dtype=codebook_dtype))
    x = torch.randn(2, tokens, in_features)
    ref = F.linear(x, layer.dequantize().float(), layer.bias)
    assert rel_error(layer(x), ref) < 1e-5


@pytest.mark.parametrize("path", [kernels.linear_histogram, kernels.linear_reference])
def test_each_linear_path_matches_reference(path):
    """Both branches of the dispatch, forced, on the same inputs (the dispatch only picks by shape)."""
    layer = filled(RPQLinear(80, 96, 12, 64, bias=False))
    for tokens in (1, 7, 300):
        x = torch.randn(tokens, 80)
        assert rel_error(path(x, layer.codebook_values(), layer.codes(), None), x @ layer.dequantize().T) < 1e-5


def test_linear_dispatch_uses_histogram_for_few_tokens(monkeypatch):
    layer = filled(RPQLinear(64, 64, 8, 16))
    calls = []
    monkeypatch.setattr(kernels, "linear_histogram", lambda *a: calls.append("hist") or torch.zeros(1))
    monkeypatch.setattr(kernels, "linear_reference", lambda *a: calls.append("ref") or torch.zeros(1))
    with torch.no_grad():
        layer(torch.randn(1, 64))  # 1 token <= 2 * D = 16
        layer(torch.randn(100, 64))
    assert calls == ["hist", "ref"]
    layer(torch.randn(1, 64))  # autograd recording: the histogram still for a few tokens
    layer(torch.randn(100, 64))  # the product that keeps only packed codes for many (kernels/trainable_product.py)
    assert calls == ["hist", "ref", "hist"]


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_linear_half_precision_within_dtype_bounds(dtype, bound):
    layer = filled(RPQLinear(256, 128, 16, 256)).to(dtype)
    ref_weight = layer.dequantize().double()
    for tokens in (1, 64):
        x = torch.randn(tokens, 256, dtype=dtype)
        out = layer(x)
        assert out.dtype == dtype
        assert rel_error(out, x.double() @ ref_weight.T + layer.bias.double()) < bound


@pytest.mark.parametrize("num_codebooks,codebook_size,codebook_dtype", [(6, 256, None), (48, 16, None), (12, 1000, "int8"), (24, 3, "int8")])
def test_embedding_forward_matches_f_embedding(num_codebooks, codebook_size, codebook_dtype):
    table = filled(RPQEmbedding(300, 48, num_codebooks, codebook_size, padding_idx=0, codebook_dtype=codebook_dtype))
    ids = torch.randint(0, 300, (3, 17))
    assert torch.equal(table(ids), F.embedding(ids, table.dequantize()))
    assert isinstance(table, nn.Embedding)


@pytest.mark.parametrize("codebook_size,codebook_dtype", [(256, None), (16, None), (16, "int8"), (256, "int8")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_compute_in_the_model_dtype(codebook_size, codebook_dtype, dtype):
    """A model cast to 16 bits gets 16-bit outputs from every layout: a float32 embedding output would
    meet a 16-bit LayerNorm next (BERT) and fail there."""
    table = filled(RPQEmbedding(300, 48, 12, codebook_size, codebook_dtype=codebook_dtype)).to(dtype)
    layer = filled(RPQLinear(48, 36, 12, codebook_size, bias=True, codebook_dtype=codebook_dtype)).to(dtype)
    head = RPQTiedHead(table, bias=False)
    ids = torch.randint(0, 300, (2, 9))
    rows = table(ids)
    assert rows.dtype == dtype and torch.equal(rows, F.embedding(ids, table.dequantize().to(dtype)))
    for tokens in (1, 64):
        x = torch.randn(tokens, 48, dtype=dtype)
        out, logits = layer(x), head(x)
        assert out.dtype == dtype and logits.dtype == dtype
        assert rel_error(out, x.double() @ layer.dequantize().double().T + layer.bias.double()) < 2e-2
        assert rel_error(logits, x.double() @ table.dequantize().double().T) < 2e-2


@pytest.mark.parametrize("num_codebooks,codebook_size,codebook_dtype", [(8, 64, None), (32, 16, "int8")])
def test_tied_head_matches_f_linear_with_decoded_table(num_codebooks, codebook_size, codebook_dtype):
    table = filled(RPQEmbedding(500, 32, num_codebooks, codebook_size, codebook_dtype=codebook_dtype))
    head = RPQTiedHead(table, bias=True)
    with torch.no_grad():
        head.bias.normal_()
    for tokens in (1, 5, 2000):  # the last one takes the decode + GEMM branch
        x = torch.randn(tokens, 32)
        ref = F.linear(x, table.dequantize().float(), head.bias)
        assert rel_error(head(x), ref) < 1e-5
    assert "embedding" not in dict(head.named_children())  # referenced, not registered twice
    assert [n for n, _ in head.named_parameters()] == ["bias"]


def test_embedding_subclass_keeps_its_own_forward():
    """OPT's learned positions add an offset in forward, then call super().forward: that must reach the codes."""
    from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

    original = OPTLearnedPositionalEmbedding(30, 16)
    rpq = filled(build_rpq_embedding(original, num_codebooks=4, codebook_size=16))
    assert isinstance(rpq, OPTLearnedPositionalEmbedding) and isinstance(rpq, RPQEmbedding)
    assert rpq.offset == 2 and "weight" not in dict(rpq.named_parameters())
    mask = torch.ones(1, 5, dtype=torch.long)
    expected = F.embedding(torch.arange(5)[None] + 2, rpq.dequantize())
    assert torch.equal(rpq(mask), expected)


@pytest.mark.parametrize("codebook_size,bits", [(2, 1), (3, 2), (16, 4), (17, 5), (256, 8), (300, 9), (65536, 16)])
def test_indices_are_packed_at_ceil_log2_k_bits(codebook_size, bits):
    layer = RPQLinear(37, 8, 2, codebook_size)
    assert layer.indices.dtype == torch.uint8 and layer.code_bits == bits
    assert layer.indices.shape == (2, packed_width(37, bits)) == (2, -(-37 * bits // 8))
    assert layer.native == (bits == 8)  # one byte per code: rpq-pytorch's (M, in) uint8 form
    with pytest.raises(ValueError):
        RPQLinear(8, 9, 2)  # M must divide out_features


def test_gpu_dispatch_routes_by_token_count_and_stays_off_on_cpu():
    from model_compress.rpq.kernels import forward as kernels
    from model_compress.rpq.kernels.config import routes as triton_dispatch

    assert kernels.gpu_kernels(torch.zeros(1)) is None  # CPU tensors always take the torch forms
    bounds = [chosen.max_tokens for chosen in triton_dispatch.ROUTES]
    assert bounds == sorted(bounds)
    for tokens in (1, 2, 5, 17, 100, 10_000):
        chosen = triton_dispatch.route(tokens)
        assert tokens <= chosen.max_tokens
        assert chosen.path in (triton_dispatch.FUSED, triton_dispatch.DECODE)
        assert chosen.path == triton_dispatch.DECODE or chosen.tile is not None


def test_tuned_routes_round_trip_through_a_file(tmp_path, monkeypatch):
    from model_compress.rpq.kernels.config import routes as triton_dispatch

    tuned = (
        triton_dispatch.Route(1, triton_dispatch.FUSED, triton_dispatch.TileConfig(1, 8, 256, 2, 4), max_weights=1000),
        triton_dispatch.Route(1, triton_dispatch.FUSED, triton_dispatch.TileConfig(1, 8, 512, 2, 4)),
        triton_dispatch.Route(1 << 62, triton_dispatch.DECODE),
    )
    triton_dispatch.save_routes(tuned, tmp_path / "routes.json")
    with options.using(routes_file=tmp_path / "routes.json"):
        assert triton_dispatch.active_routes() == tuned
        assert triton_dispatch.route(1).tile.block_k == 512  # no size given: the unrestricted route
        assert triton_dispatch.route(1, 1000).tile.block_k == 256
        assert triton_dispatch.route(1, 1001).tile.block_k == 512
        assert triton_dispatch.route(2).path == triton_dispatch.DECODE
    assert triton_dispatch.active_routes() == triton_dispatch.ROUTES


class _RecordingKernels:
    """Stands in for ``triton_kernels`` on the CPU: records which kernel and tile a routed call would launch."""

    MAX_GROUP = 3

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @staticmethod
    def binned_fits(tile, codebooks) -> bool:
        return tile.kind == "binned"

    def linear_binned(self, x, codebooks, bins, bias, tile, norm=None):
        self.calls.append(("binned", tile))

    def linear_binned_group(self, x, members, tile, norm=None, up=None):
        self.calls.append(("binned group", tile))
        return [None] * len(members)

    def linear_fused(self, x, codebooks, indices, bias, tile):
        self.calls.append(("gather", tile))

    def linear_decode(self, x, codebooks, indices, bias):
        self.calls.append(("decode", None))


def test_one_token_route_depends_on_layer_size_and_bins_switch(monkeypatch):
    """Small layers take the small-layer one-token tile, larger ones (or a sibling group) the other; bins off: gather."""
    from model_compress.rpq.kernels import forward as kernels
    from model_compress.rpq.kernels.config import routes as triton_dispatch

    recorder = _RecordingKernels()
    monkeypatch.setattr(kernels, "gpu_kernels", lambda tensor: recorder)
    one_token = [r for r in triton_dispatch.ROUTES if r.max_tokens == 1]
    small, large = one_token[0], one_token[-1]  # the smallest size class and the unrestricted route
    assert small.max_weights is not None and large.max_weights is None and small.tile != large.tile
    side = 64  # 64 x 64 is a small layer, 3 of them too; a layer above every class is large
    codebooks, indices = torch.zeros(4, 16, side // 4), torch.zeros(4, side, dtype=torch.uint8)
    big_in = max(r.max_weights for r in one_token[:-1]) // side + 1
    big_indices = torch.zeros(4, big_in, dtype=torch.uint8)
    bins = lambda: (torch.zeros(1), torch.zeros(1))
    kernels.linear_forward(torch.zeros(1, side), codebooks, indices, None, bins)
    kernels.linear_forward(torch.zeros(1, big_in), codebooks, big_indices, None, bins)
    kernels.linear_forward(torch.zeros(1, side), codebooks, indices, None, None)  # no bins: the gather tile
    kernels.linear_forward(torch.zeros(40, side), codebooks, indices, None, bins)  # more tokens: the table's gather tile
    members = [(torch.zeros(4, 16, big_in // 4), bins, None)] * 3  # each above every class
    kernels.linear_group_forward(torch.zeros(1, side), members)
    assert recorder.calls == [
        ("binned", small.tile),
        ("binned", large.tile),
        ("gather", triton_dispatch.ONE_TOKEN_GATHER),
        ("gather", triton_dispatch.route(40).tile),
        ("binned group", large.tile),
    ]
    recorder.calls.clear()
    with options.using(bins=False):
        kernels.linear_forward(torch.zeros(1, side), codebooks, indices, None, bins)
        assert kernels.linear_group_forward(torch.zeros(1, side), members) is None
    assert recorder.calls == [("gather", triton_dispatch.ONE_TOKEN_GATHER)]


@pytest.mark.parametrize("tokens", [2, 4, 16])
def test_few_token_route_depends_on_layer_size(monkeypatch, tokens):
    """2-16 tokens: a SmolLM2-sized layer, one up to 2048 x 2048 and a larger one each take their class's gather tile."""
    from model_compress.rpq.kernels import forward as kernels
    from model_compress.rpq.kernels.config import routes as triton_dispatch

    recorder = _RecordingKernels()
    monkeypatch.setattr(kernels, "gpu_kernels", lambda tensor: recorder)
    bucket = [r for r in triton_dispatch.ROUTES if r.max_tokens == min(b for b in (4, 16) if tokens <= b)]
    assert [r.max_weights for r in bucket] == [triton_dispatch.TINY_LAYER, triton_dispatch.SMALL_LAYER, None]
    codebooks = torch.zeros(32, 16, 2)  # out = 64
    for in_features in (triton_dispatch.TINY_LAYER // 64, triton_dispatch.SMALL_LAYER // 64, triton_dispatch.SMALL_LAYER // 64 + 1):
        kernels.linear_forward(torch.zeros(tokens, in_features), codebooks, torch.zeros(32, in_features, dtype=torch.uint8), None)
    assert recorder.calls == [("gather", r.tile) for r in bucket]
    assert bucket[0].tile != bucket[1].tile != bucket[2].tile


def test_whole_codebook_tiles_count_the_codebooks_a_tile_holds():
    from model_compress.rpq.kernels.config.routes import heads_per_tile

    assert heads_per_tile(256, 128) == 1 and heads_per_tile(64, 64) == 1  # inside one codebook
    assert heads_per_tile(64, 128) == 2 and heads_per_tile(8, 16) == 2
    assert heads_per_tile(64, 256) == 0 and heads_per_tile(8, 64) == 0  # more than two: not a tile of whole codebooks
    assert heads_per_tile(18, 36) == 0 and heads_per_tile(48, 96) == 0  # not a power of two: straddles
    assert heads_per_tile(4, 8) == 0 and heads_per_tile(96, 64) == 0  # rows under 16 bytes; tile across a piece's end


def test_aligned_route_takes_decode_where_pieces_do_not_tile(monkeypatch):
    """A prompt-sized route of whole-codebook tiles runs the gather kernel on 64-wide pieces, decode + cuBLAS on 18-wide."""
    from model_compress.rpq.kernels import forward as kernels
    from model_compress.rpq.kernels.config import routes as triton_dispatch

    recorder = _RecordingKernels()
    monkeypatch.setattr(kernels, "gpu_kernels", lambda tensor: recorder)
    tile = triton_dispatch.TileConfig(128, 128, 64, 8, 4, aligned=True)
    monkeypatch.setattr(triton_dispatch, "active_routes", lambda: (triton_dispatch.Route(1 << 62, triton_dispatch.FUSED, tile),))
    for piece in (64, 18, 256):
        codebooks = torch.zeros(4, 16, piece)
        kernels.linear_forward(torch.zeros(200, 96), codebooks, torch.zeros(4, 96, dtype=torch.uint8), None)
    assert recorder.calls == [("gather", tile), ("decode", None), ("gather", tile)]


@pytest.mark.parametrize("columns, codebook_size", [(37, 16), (300, 256), (2048, 256), (40000, 256)])
def test_code_bins_group_each_codebooks_columns_by_code(columns, codebook_size):
    from model_compress.rpq.kernels.layout import code_bins

    gen = torch.Generator().manual_seed(columns)
    # Skewed codes, as k-means gives: a few codes take many columns.
    weights = torch.rand(codebook_size, generator=gen) ** 4
    indices = torch.multinomial(weights, 3 * columns, replacement=True, generator=gen).view(3, columns).to(torch.uint8)
    slots, row_codes = code_bins(indices, codebook_size)
    rows, width = slots.shape[1:]
    assert slots.dtype == (torch.int16 if columns <= 32767 else torch.int32) and row_codes.dtype == torch.int16
    assert rows % 8 == 0 and rows < columns // width + codebook_size + 8
    assert int((slots >= 0).any(-1).sum(-1).max()) > rows - 8  # no more padding rows than the alignment
    x = torch.randn(columns, dtype=torch.float64, generator=gen)
    used = slots >= 0
    for head in range(3):
        assert torch.equal(torch.sort(slots[head][used[head]].long()).values, torch.arange(columns))  # each column once
        codes_of_slots = indices[head].long()[slots[head].long().clamp(min=0)]
        assert torch.all((codes_of_slots == row_codes[head, :, None].long()) | ~used[head])  # a row holds one code
        row_sums = torch.where(used[head], x[slots[head].long().clamp(min=0)], 0.0).sum(1)
        hist = torch.zeros(codebook_size, dtype=torch.float64).index_add_(0, row_codes[head].long(), row_sums)
        expected = torch.zeros(codebook_size, dtype=torch.float64).scatter_add_(0, indices[head].long(), x)
        torch.testing.assert_close(hist, expected)


def test_linear_keeps_its_code_bins_until_the_codes_change():
    layer = filled(RPQLinear(64, 32, 4, 256))
    first = layer.code_bins()
    assert layer.code_bins() is first
    layer.indices[0, 0] = (int(layer.indices[0, 0]) + 1) % 256
    second = layer.code_bins()
    assert second is not first
    assert "_code_bins" not in layer.state_dict()


def test_shared_input_group_serves_siblings_from_one_computation(monkeypatch):
    """q/k/v (and gate/up) of one shape form a group; one computation per input tensor serves all of them,
    a different tensor or an in-place write recomputes, out_proj is never grouped, and logits are unchanged."""
    from model_compress.rpq.kernels import forward as kernels
    from model_compress.rpq.fusions.shared_input import group_shared_inputs

    from ..conftest import native_rpq, tiny_model

    calls = []

    def fake_group_forward(x, members, norm=None, routes=None):  # what the GPU's one launch computes, in plain torch
        calls.append(len(members))
        return [kernels.linear_reference(x, cb, bins_owner_indices[id(cb)], bias) for cb, _, bias in members]

    model = tiny_model("llama")
    native_rpq(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        expected = model(ids).logits
    assert group_shared_inputs(model) == 2 * model.config.num_hidden_layers  # {k, v} (q has another D) and {gate, up}
    attention = model.model.layers[0].self_attn
    assert "_shared_input" not in attention.q_proj.__dict__ and "_shared_input" not in attention.o_proj.__dict__
    assert attention.k_proj.__dict__["_shared_input"] is attention.v_proj.__dict__["_shared_input"]
    bins_owner_indices = {id(m.codebooks): m.indices for m in model.modules() if isinstance(m, RPQLinear)}
    monkeypatch.setattr(kernels, "linear_group_forward", fake_group_forward)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
    assert calls == [2] * (2 * model.config.num_hidden_layers)  # one computation per group per forward

    group = attention.k_proj.__dict__["_shared_input"]
    x = torch.randn(1, 5, attention.k_proj.in_features)
    calls.clear()
    k, v = attention.k_proj(x), attention.v_proj(x)
    torch.testing.assert_close(v, kernels.linear_reference(x, attention.v_proj.codebooks, attention.v_proj.indices, None))
    assert calls == [2] and not group._pending
    attention.k_proj(x)
    x.add_(1.0)  # written in place: the kept v output would be stale
    torch.testing.assert_close(attention.v_proj(x), kernels.linear_reference(x, attention.v_proj.codebooks, attention.v_proj.indices, None))
    assert calls == [2, 2, 2]


def _record_route_choices(monkeypatch, chooser: str):
    """Kernels that record their launches, and the token counts the route table was asked about through ``chooser``."""
    from model_compress.rpq.kernels import forward as kernels

    recorder, asked = _RecordingKernels(), []
    monkeypatch.setattr(kernels, "gpu_kernels", lambda tensor: recorder)
    choose = getattr(kernels, chooser)
    monkeypatch.setattr(kernels, chooser, lambda *args: asked.append(args[0]) or choose(*args))
    return recorder, asked


def test_a_layers_route_is_chosen_once_per_token_count_and_kept(monkeypatch):
    """The route table is asked on the first call of a token count only; a new count, or other options, asks again."""
    from model_compress.rpq.kernels import forward as kernels

    recorder, asked = _record_route_choices(monkeypatch, "choose_linear_route")
    codebooks, indices, routes = torch.zeros(4, 16, 16), torch.zeros(4, 64, dtype=torch.uint8), {}
    bins = lambda: (torch.zeros(1), torch.zeros(1))
    for tokens in (1, 1, 40, 1, 40):
        kernels.linear_forward(torch.zeros(tokens, 64), codebooks, indices, None, bins, routes=routes)
    assert asked == [1, 40] and len(routes) == 2
    with options.using(bins=False):
        kernels.linear_forward(torch.zeros(1, 64), codebooks, indices, None, bins, routes=routes)
    assert asked == [1, 40, 1] and recorder.calls[-1][0] == "gather"
    layer = RPQLinear(64, 64, 4, 256)  # 8-bit codes, float codebooks: the form the kernels read
    layer(torch.zeros(1, 64))
    layer(torch.zeros(1, 64))
    assert len(layer.__dict__["_routes"]) == 1


def test_a_groups_route_is_chosen_once_per_token_count_and_kept(monkeypatch):
    """q/k/v in one launch and the gated down_proj ask the route table once per count too, and keep a miss as a miss."""
    from model_compress.rpq.kernels import forward as kernels

    recorder, asked = _record_route_choices(monkeypatch, "choose_group_route")
    bins = lambda: (torch.zeros(1), torch.zeros(1))
    members, routes = [(torch.zeros(4, 16, 16), bins, None)] * 3, {}
    for tokens in (1, 1, 40, 40, 1):
        outputs = kernels.linear_group_forward(torch.zeros(tokens, 64), members, routes=routes)
        assert (outputs is None) == (tokens == 40)  # many tokens: no one-launch route, each layer runs alone
    assert asked == [1, 40] and recorder.calls == [("binned group", recorder.calls[0][1])] * 3
    gated_routes = {}
    for _ in range(2):
        kernels.gated_linear_forward(torch.zeros(1, 64), torch.zeros(1, 64), members[0][0], None, bins, gated_routes)
    assert asked == [1, 40, 1] and len(gated_routes) == 1


def test_layers_that_keep_their_weights_decoded_compute_the_same_and_say_what_it_costs():
    """keep_decoded: plain matrix products on a 16-bit copy (a non-persistent buffer), same outputs, codes kept."""
    from model_compress.rpq.kernels.rotation import random_signs

    linear = filled(RPQLinear(64, 48, 48, 16, codebook_dtype="int8", rotation_block=16))
    linear.set_signs(random_signs(64, 0))
    table = filled(RPQEmbedding(100, 64, 32, 128, codebook_dtype="int8", rotation_block=16), seed=1)
    table.set_signs(random_signs(64, 1))
    head = RPQTiedHead(table)
    x, ids = torch.randn(3, 64), torch.tensor([[1, 99, 7]])
    with torch.no_grad():
        expected = linear(x), table(ids), head(x)
        added = linear.keep_decoded(torch.float16) + table.keep_decoded(torch.float16)
        assert added == 2 * (48 * 64 + 100 * 64)
        assert "decoded_weight" not in linear.state_dict() and linear.decoded.dtype == torch.float16
        for got, want in zip((linear(x), table(ids), head(x)), expected):
            assert got.dtype == want.dtype and rel_error(got, want) < 2e-3  # float16 weights: their rounding
        assert linear.keep_decoded(None) == 0 and linear.decoded is None
        torch.testing.assert_close(linear(x), expected[0])
