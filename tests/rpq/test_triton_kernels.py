"""Every Triton path against the torch reference, on random inputs of many shapes, fp16 and bf16.

CUDA only: CI has no GPU, so these skip there; benchmarks/device/gpu_rpq.sh runs them on the lent GPU.
"""

from __future__ import annotations

import pytest
import torch

from model_compress.rpq.kernels.config import options
from model_compress.rpq.kernels import forward as kernels
from model_compress.rpq.kernels.config import routes as triton_dispatch
from model_compress.rpq.fusions.norm import defer_norms
from model_compress.rpq.layers.modules import RPQEmbedding, RPQLinear
from model_compress.rpq.kernels.layout import code_bins
from model_compress.rpq.kernels.config.norm_spec import LAYER_NORM, RMS_NORM, NormSpec

from ..conftest import filled, native_rpq, rel_error, tiny_model

triton_kernels = pytest.importorskip("model_compress.rpq.kernels.triton", reason="needs Triton")
pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
# Relative (Frobenius) error bounds against a float64 reference: output rounding plus fp32 accumulation.
BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
# (in, out, M, K): the opt-1.3b shapes, SmolLM2's (D=18, 48), odd sizes, D=2 (M=288), K=16 and K=1024 (uint16 codes).
LINEAR_SHAPES = [
    (2048, 2048, 32, 256),
    (2048, 8192, 32, 256),
    (8192, 2048, 32, 256),
    (576, 576, 32, 256),
    (576, 1536, 32, 256),
    (1536, 576, 288, 256),
    (100, 72, 8, 256),
    (37, 13, 13, 16),
    (200, 96, 4, 1024),
]
TOKENS = [1, 2, 3, 5, 16, 17, 64, 100, 513]


def random_codes(num_codebooks: int, codebook_size: int, piece: int, columns: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(num_codebooks, codebook_size, piece, generator=gen).to(CUDA, dtype)
    # one code per byte (per two bytes above K = 256): the unpacked codes the kernels read
    indices = torch.randint(0, codebook_size, (num_codebooks, columns), generator=gen).to(CUDA, torch.uint8 if codebook_size <= 256 else torch.uint16)
    return codebooks, indices


def reference(x: torch.Tensor, codebooks: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = kernels.linear_reference(x.double(), codebooks.double(), indices, None)
    return out if bias is None else out + bias.double()


# Split-K tiles beside the routed ones: their counters must come back to 0 (each tile is run twice).
SPLIT_TILES = [
    triton_dispatch.TileConfig(1, 16, 128, split_k=8),
    triton_dispatch.TileConfig(16, 32, 64, split_k=3),
    # L2 prefetch of the weights, and programmatic dependent launch (a no-op flag before Hopper).
    triton_dispatch.TileConfig(1, 64, 256, split_k=8, prefetch=True, pdl=True),
    triton_dispatch.TileConfig(16, 32, 64, split_k=3, prefetch=True),
    triton_dispatch.TileConfig(1, 32, 128, prefetch=True, pdl=True),
]
# Whole-codebook tiles (two pieces side by side where pieces are 64 wide, inside one where 256), also split-K.
ALIGNED_TILES = [
    triton_dispatch.TileConfig(64, 128, 64, aligned=True),
    triton_dispatch.TileConfig(128, 128, 64, num_warps=8, num_stages=4, split_k=2, aligned=True),
    triton_dispatch.TileConfig(4, 128, 64, aligned=True),  # no tensor cores: the broadcast form, per codebook
    triton_dispatch.TileConfig(16, 128, 32, split_k=3, aligned=True),
]


def fused_tiles() -> list[triton_dispatch.TileConfig]:
    routed = [chosen.tile for chosen in triton_dispatch.active_routes() if chosen.path == triton_dispatch.FUSED]
    return routed + SPLIT_TILES + ALIGNED_TILES


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_linear_every_tile_matches_reference(shape, dtype):
    in_features, out_features, num_codebooks, codebook_size = shape
    codebooks, indices = random_codes(num_codebooks, codebook_size, out_features // num_codebooks, in_features, dtype)
    bias = torch.randn(out_features, device=CUDA, dtype=dtype)
    for tokens in TOKENS:
        x = torch.randn(tokens, in_features, device=CUDA, dtype=dtype)
        ref = reference(x, codebooks, indices, bias)
        for tile in fused_tiles():
            for _ in range(2):
                out = triton_kernels.linear_fused(x, codebooks, indices, bias, tile)
                assert out.dtype == dtype and out.shape == ref.shape
                assert rel_error(out, ref) < BOUNDS[dtype], (tokens, tile.describe())
        assert rel_error(triton_kernels.linear_decode(x, codebooks, indices, bias), ref) < BOUNDS[dtype], tokens


BINNED_TILES = [
    triton_dispatch.TileConfig(1, 16, 256, kind=triton_dispatch.BINNED),
    triton_dispatch.TileConfig(1, 64, 128, num_warps=8, kind=triton_dispatch.BINNED, prefetch=True, pdl=True),
    triton_dispatch.TileConfig(4, 32, 128, kind=triton_dispatch.BINNED, prefetch=True),
    triton_dispatch.TileConfig(16, 16, 256, num_warps=8, kind=triton_dispatch.BINNED),
    # x's row loaded whole and gathered on chip (local_x), with and without PRELOAD.
    triton_dispatch.TileConfig(4, 32, 128, kind=triton_dispatch.BINNED, local_x=True),
    LOCAL_X_TILE := triton_dispatch.TileConfig(1, 8, 1024, num_warps=2, kind=triton_dispatch.BINNED, prefetch=True, pdl=True, local_x=True),
    # PDL with every row in one block: the weights are loaded before the wait for x (PRELOAD).
    triton_dispatch.TileConfig(1, 8, 1024, num_warps=2, kind=triton_dispatch.BINNED, pdl=True),
]
# The binned tiles the group, norm and gated tests run: per-slot loads with and without PDL, local_x, PRELOAD.
FEATURE_BINNED_TILES = (BINNED_TILES[0], BINNED_TILES[1], LOCAL_X_TILE, BINNED_TILES[-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_binned_linear_every_tile_matches_reference(shape, dtype):
    in_features, out_features, num_codebooks, codebook_size = shape
    codebooks, indices = random_codes(num_codebooks, codebook_size, out_features // num_codebooks, in_features, dtype)
    bins = code_bins(indices, codebook_size)
    bias = torch.randn(out_features, device=CUDA, dtype=dtype)
    for tokens in [1, 2, 3, 16, 17, 40]:
        x = torch.randn(tokens, in_features, device=CUDA, dtype=dtype) * 4
        ref = reference(x, codebooks, indices, bias)
        for tile in BINNED_TILES:
            assert triton_kernels.binned_fits(tile, codebooks)
            out = triton_kernels.linear_binned(x, codebooks, bins, bias, tile)
            assert out.dtype == dtype and out.shape == ref.shape
            assert rel_error(out, ref) < BOUNDS[dtype], (tokens, tile.describe())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_routed_module_forward_matches_reference_in_3d_without_bias(dtype, tokens):
    layer = filled(RPQLinear(320, 192, 16, 256, bias=False)).to(CUDA, dtype)
    x = torch.randn(2, tokens, 320, device=CUDA, dtype=dtype)[:, :, :]
    ref = reference(x, layer.codebooks, layer.indices, None)
    out = layer(x)
    assert out.shape == (2, tokens, 192)
    assert rel_error(out, ref) < BOUNDS[dtype]


def test_non_contiguous_input():
    codebooks, indices = random_codes(8, 256, 16, 96, torch.float16)
    x = torch.randn(96, 10, device=CUDA, dtype=torch.float16).T  # rows with stride 1 along the wrong axis
    assert rel_error(kernels.linear_forward(x, codebooks, indices, None), reference(x, codebooks, indices, None)) < BOUNDS[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(50272, 2048, 32), (49152, 576, 32), (1000, 72, 36), (77, 10, 5)])
def test_embedding_gathers_exact_rows(shape, dtype):
    rows, dim, num_codebooks = shape
    layer = filled(RPQEmbedding(rows, dim, num_codebooks)).to(CUDA, dtype)
    ids = torch.randint(0, rows, (3, 11), device=CUDA)
    out = layer(ids)
    assert out.shape == (3, 11, dim)
    assert torch.equal(out, layer.dequantize()[ids])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(49152, 576, 32), (1000, 72, 36), (77, 10, 5)])
@pytest.mark.parametrize("tokens", [1, 3, 16, 40])
def test_tied_head_paths_match_reference(shape, tokens, dtype):
    vocab, dim, num_codebooks = shape
    gen = torch.Generator().manual_seed(0)
    codebooks = torch.randn(num_codebooks, 256, dim // num_codebooks, generator=gen).to(CUDA, dtype)
    indices = torch.randint(0, 256, (num_codebooks, vocab), generator=gen).to(CUDA, torch.uint8)
    bias = torch.randn(vocab, device=CUDA, dtype=dtype)
    x = torch.randn(tokens, dim, device=CUDA, dtype=dtype)
    ref = kernels.tied_head_reference(x.double(), codebooks.double(), indices, bias.double())
    scored = triton_kernels.tied_head_scores(x, codebooks, indices, bias)
    decoded = triton_kernels.tied_head_decode(x, codebooks, indices, bias, chunk_bytes=dim * 2 * 333)  # several chunks
    routed = kernels.tied_head_forward(x, codebooks, indices, bias)
    for out in (scored, decoded, routed):
        assert out.shape == (tokens, vocab)
        assert rel_error(out, ref) < BOUNDS[dtype]


@pytest.mark.parametrize("tokens", [1, 512])
def test_capturable_in_a_cuda_graph_without_host_syncs(tokens):
    """Warm up, capture the RPQ layers, replay on new inputs: same answers as eager, no sync while running."""
    linear = filled(RPQLinear(2048, 2048, 32)).to(CUDA, torch.float16)
    embedding = filled(RPQEmbedding(5000, 2048, 32)).to(CUDA, torch.float16)
    x = torch.randn(tokens, 2048, device=CUDA, dtype=torch.float16)
    ids = torch.randint(0, 5000, (tokens,), device=CUDA)

    def forward():
        return linear(x) + embedding(ids)

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.randint(0, 5000, (tokens,), device=CUDA))
        graph.replay()
        assert rel_error(out, forward()) < 1e-6


def test_whole_model_on_cuda_uses_the_kernels_and_matches_the_reference():

    model = tiny_model("llama").to(CUDA, torch.float16).eval()
    native_rpq(model)  # K = 256 and a byte per code: the form the fused paths run (convert_model keeps tiny layers dense)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), device=CUDA)
    with torch.inference_mode():
        fast = model(ids).logits
        with options.using(triton=False):
            slow = model(ids).logits
    assert rel_error(fast, slow) < BOUNDS[torch.float16]


CHAIN_CASES = [(tile, None) for tile in (SPLIT_TILES[-3], SPLIT_TILES[-1], BINNED_TILES[1], BINNED_TILES[-1])] + [
    (BINNED_TILES[1], RMS_NORM), (BINNED_TILES[-1], LAYER_NORM),  # a fused norm takes x's statistics after the wait too
    (LOCAL_X_TILE, None), (LOCAL_X_TILE, RMS_NORM),  # x's whole row is loaded after the wait as well
]


@pytest.mark.parametrize("tile, norm_kind", CHAIN_CASES, ids=lambda case: case.describe() if hasattr(case, "describe") else str(case))
def test_dependent_launch_chain_reads_each_input_after_it_is_written(tile, norm_kind):
    """Eight layers, each fed the previous one's output: with PDL a program starts before its input is
    written, so a read of x before ``gdc_wait`` would show here (eagerly and in a replayed CUDA graph)."""
    width, depth = 2048, 8
    layers = [random_codes(32, 256, width // 32, width, torch.float32, seed=seed) for seed in range(depth)]
    layers = [(codebooks / width**0.5, indices) for codebooks, indices in layers]  # keeps the activations near unit size
    bins = {id(indices): code_bins(indices, 256) for _, indices in layers}
    gamma = torch.rand(width, device=CUDA) + 0.5
    spec = None if norm_kind is None else NormSpec(gamma, 1e-5, norm_kind)

    def normalise(x):
        x = x.double()
        if norm_kind == LAYER_NORM:
            return torch.nn.functional.layer_norm(x, (width,), gamma.double(), None, 1e-5)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double() if norm_kind == RMS_NORM else x

    def chain(x, forward):
        for codebooks, indices in layers:
            x = forward(x, codebooks, indices)
        return x

    def fused(x, codebooks, indices):
        if tile.kind == triton_dispatch.BINNED:
            return triton_kernels.linear_binned(x, codebooks, bins[id(indices)], None, tile, spec)
        return triton_kernels.linear_fused(x, codebooks, indices, None, tile)

    def exact(x, codebooks, indices):
        return kernels.linear_reference(normalise(x), codebooks.double(), indices, None).float()

    x = torch.randn(1, width, device=CUDA)
    assert rel_error(chain(x, fused), chain(x, exact)) < 1e-4
    with torch.inference_mode():
        out = chain(x, fused)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x, fused)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            assert rel_error(out, chain(x, exact)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [LINEAR_SHAPES[0], LINEAR_SHAPES[3], LINEAR_SHAPES[6]], ids=lambda s: "x".join(map(str, s)))
def test_binned_group_gives_each_member_its_own_output(shape, dtype):
    """Up to three layers of one shape on the same x in one launch (q/k/v): each output against its reference."""
    in_features, out_features, num_codebooks, codebook_size = shape
    layers = [random_codes(num_codebooks, codebook_size, out_features // num_codebooks, in_features, dtype, seed=s) for s in range(3)]
    skewed = layers[1][1].clone()
    skewed[:, : in_features // 2] = 0  # one code takes half the inputs: this member has more bin rows than the others
    layers[1] = (layers[1][0], skewed)
    biases = [torch.randn(out_features, device=CUDA, dtype=dtype) for _ in layers]
    for tokens in [1, 3]:
        x = torch.randn(tokens, in_features, device=CUDA, dtype=dtype) * 4
        for count in (1, 2, 3):
            members = [(cb, code_bins(idx, codebook_size), bias) for (cb, idx), bias in zip(layers[:count], biases)]
            for tile in FEATURE_BINNED_TILES:
                outs = triton_kernels.linear_binned_group(x, members, tile)
                for (cb, idx), bias, out in zip(layers, biases, outs):
                    assert rel_error(out, reference(x, cb, idx, bias)) < BOUNDS[dtype], (tokens, count, tile.describe())


@pytest.mark.parametrize("norm_kind", [LAYER_NORM, RMS_NORM])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [LINEAR_SHAPES[0], LINEAR_SHAPES[3], LINEAR_SHAPES[6]], ids=lambda s: "x".join(map(str, s)))
def test_binned_kernel_applies_the_norm_of_its_input(shape, dtype, norm_kind):
    """x is a norm's input (fused_norm): outputs against norm-then-layer in float64, with the norm bias in the layer bias."""
    in_features, out_features, num_codebooks, codebook_size = shape
    layers = [random_codes(num_codebooks, codebook_size, out_features // num_codebooks, in_features, dtype, seed=s) for s in range(3)]
    gamma = (torch.rand(in_features, device=CUDA) + 0.5).to(dtype)
    beta = torch.randn(in_features, device=CUDA, dtype=dtype) if norm_kind == LAYER_NORM else None
    biases = [torch.randn(out_features, device=CUDA, dtype=dtype) for _ in layers]
    spec = NormSpec(gamma, 1e-5, norm_kind)
    for tokens in [1, 3]:
        x = torch.randn(tokens, in_features, device=CUDA, dtype=dtype) * 3 + 1  # a mean the LayerNorm has to take out
        xd = x.double()
        if norm_kind == LAYER_NORM:
            normed = torch.nn.functional.layer_norm(xd, (in_features,), gamma.double(), beta.double(), 1e-5)
        else:
            normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()
        folded = [
            (b.double() + (kernels.linear_reference(beta.double()[None], cb.double(), idx, None)[0] if beta is not None else 0)).to(dtype)
            for (cb, idx), b in zip(layers, biases)
        ]
        for count in (1, 3):
            members = [(cb, code_bins(idx, codebook_size), bias) for (cb, idx), bias in zip(layers[:count], folded)]
            for tile in FEATURE_BINNED_TILES:
                outs = triton_kernels.linear_binned_group(x, members, tile, spec)
                for (cb, idx), bias, out in zip(layers, biases, outs):
                    ref = kernels.linear_reference(normed, cb.double(), idx, None) + bias.double()
                    assert rel_error(out, ref) < BOUNDS[dtype], (tokens, count, tile.describe())


def test_host_helpers_match_triton():
    """The launch wrappers' plain-Python ceil-div and next power of two (Triton's are constexpr functions, ~10 us a call)."""
    import triton

    for n in range(0, 5000):
        assert triton_kernels._next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16, 128, 1024):
            assert triton_kernels._cdiv(n, d) == triton.cdiv(n, d)


def test_split_k_counters_grow_to_the_largest_call_and_keep_the_smaller_ones():
    """Counters sized to the call (not a fixed 16 KB), and one a CUDA graph may hold is never freed by a larger call."""
    triton_kernels.clear_workspaces()
    small = triton_kernels.tile_counters(24, CUDA)
    assert small.numel() == 128 and triton_kernels.kept_bytes() == 512
    assert triton_kernels.tile_counters(100, CUDA) is small
    large = triton_kernels.tile_counters(1000, CUDA)
    assert large.numel() == 1024 and triton_kernels.tile_counters(24, CUDA) is large
    assert triton_kernels.kept_bytes() == 512 + 4096  # the small one is still there
    triton_kernels.clear_workspaces()
    assert triton_kernels.kept_bytes() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [LINEAR_SHAPES[5], LINEAR_SHAPES[2], LINEAR_SHAPES[6]], ids=lambda s: "x".join(map(str, s)))
def test_binned_kernel_forms_the_gated_input(shape, dtype):
    """down_proj of a SiLU-gated MLP (fused_glu): silu(gate) * up formed in the kernel, against float64."""
    in_features, out_features, num_codebooks, codebook_size = shape
    codebooks, indices = random_codes(num_codebooks, codebook_size, out_features // num_codebooks, in_features, dtype)
    bias = torch.randn(out_features, device=CUDA, dtype=dtype)
    bins = code_bins(indices, codebook_size)
    for tokens in [1, 3]:
        both = torch.randn(tokens, 2 * in_features, device=CUDA, dtype=dtype) * 3  # gate and up as the group writes them
        gate, up = both[:, :in_features], both[:, in_features:]
        product = torch.nn.functional.silu(gate.double()) * up.double()
        ref = reference(product, codebooks, indices, bias)
        for tile in FEATURE_BINNED_TILES:
            out = triton_kernels.linear_binned(gate, codebooks, bins, bias, tile, up=up)
            assert rel_error(out, ref) < BOUNDS[dtype], (tokens, tile.describe())


def logits_on_the_torch_path(model: torch.nn.Module, ids: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The same model's logits with the Triton kernels switched off: the torch paths, the reference."""
    with options.using(triton=False), torch.inference_mode():
        return model(ids).logits


def test_whole_llama_decodes_with_fused_norms_and_gated_mlps_like_the_reference(monkeypatch):
    """As loading installs them: grouped q/k/v and gate/up, deferred norms, down_proj forming silu(gate) * up; one token."""
    from model_compress.rpq.fusions.glu import fuse_gated_mlps
    from model_compress.rpq.fusions.shared_input import group_shared_inputs

    model = tiny_model("llama").to(CUDA, torch.float16).eval()
    native_rpq(model)  # K = 256 and a byte per code: the form the fused paths run (convert_model keeps tiny layers dense)
    group_shared_inputs(model)
    defer_norms(model)
    assert fuse_gated_mlps(model) == model.config.num_hidden_layers
    gated = []
    group = triton_kernels.linear_binned_group
    monkeypatch.setattr(triton_kernels, "linear_binned_group", lambda *a, **k: gated.append(k.get("up") is not None) or group(*a, **k))
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device=CUDA)
    with torch.inference_mode():
        fast = model(ids).logits
        assert sum(gated) == model.config.num_hidden_layers  # every down_proj took gate and up
    assert rel_error(fast, logits_on_the_torch_path(model, ids, monkeypatch)) < BOUNDS[torch.float16]


@pytest.mark.parametrize("deferred_norms", [False, True], ids=["norms", "deferred-norms"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_grouped_siblings_decode_one_token_like_the_reference(arch, deferred_norms, monkeypatch):
    """A loaded-style model with q/k/v (gate/up) grouped: one-token steps take the group launch and match the torch path."""
    from model_compress.rpq.fusions.shared_input import group_shared_inputs

    model = tiny_model(arch).to(CUDA, torch.float16).eval()
    native_rpq(model)  # K = 256 and a byte per code: the form the fused paths run (convert_model keeps tiny layers dense)
    assert group_shared_inputs(model) > 0
    if deferred_norms:  # as loading does: the pre-norms run inside the grouped (and fc1's) binned launches
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                with torch.no_grad():
                    module.weight.uniform_(0.5, 1.5)
                    if getattr(module, "bias", None) is not None:
                        module.bias.uniform_(-0.5, 0.5)
        assert defer_norms(model) == 2 * model.config.num_hidden_layers
    launches = []
    group_forward = kernels.linear_group_forward
    monkeypatch.setattr(kernels, "linear_group_forward", lambda x, members, *norm, **kw: launches.append(len(members)) or group_forward(x, members, *norm, **kw))
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device=CUDA)
    with torch.inference_mode():
        fast = model(ids).logits
        assert launches and all(count > 1 for count in launches)
    assert rel_error(fast, logits_on_the_torch_path(model, ids, monkeypatch)) < BOUNDS[torch.float16]


def test_one_token_without_bins_reads_the_codes_and_matches_the_reference(monkeypatch):
    """Bins off (MODEL_COMPRESS_RPQ_BINS=0): one-token steps take the gather tile, no layer makes code bins, logits as the torch path."""
    from model_compress.rpq.layers.modules import RPQLinear

    model = tiny_model("opt").to(CUDA, torch.float16).eval()
    native_rpq(model)  # K = 256 and a byte per code: the form the fused paths run (convert_model keeps tiny layers dense)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device=CUDA)
    with options.using(bins=False), torch.inference_mode():
        fast = model(ids).logits
        with options.using(triton=False):
            slow = model(ids).logits
    assert not any("_code_bins" in module.__dict__ for module in model.modules() if isinstance(module, RPQLinear))
    assert rel_error(fast, slow) < BOUNDS[torch.float16]
