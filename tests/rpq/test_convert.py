"""Conversion of tiny OPT / GPT-2 / Llama / BERT models: plans, round trip, ties, settings."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import model_compress
from model_compress.core.errors import UserError
from model_compress.rpq.convert import LayerPlan, RPQSettings, convert_model, find_layers, nearest_divisor, plan_layers
from model_compress.rpq.layers.modules import RPQEmbedding, RPQLinear, RPQTiedHead
from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

from ..conftest import tiny_config, tiny_model

SMALL = dict(num_codebooks=8, codebook_size=16)
QUICK = CalibrationOptions(tokens=1024)  # a few windows of the packaged calibration mix: enough to exercise the data path
NO_DATA = CalibrationOptions(enabled=False)


def rpq_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (RPQLinear, RPQEmbedding, RPQTiedHead))}


def test_round_trip_is_bit_identical_and_ties_survive(arch, tiny_folder, tmp_path):
    folder = tiny_folder(arch)
    run = compress_rpq(str(folder), tmp_path / "out", RPQSettings(**SMALL), calibration=QUICK)
    loaded = model_compress.load(tmp_path / "out")

    converted, reloaded = rpq_modules(run.model), rpq_modules(loaded)
    assert converted.keys() == reloaded.keys() and converted
    for name, module in converted.items():
        assert torch.equal(module.dequantize(), reloaded[name].dequantize()), name
        if not isinstance(module, RPQTiedHead):
            assert reloaded[name].indices.dtype == torch.uint8

    # Every supported layer became RPQ, except those the config lists as too small to gain
    # (BERT's 2-row token-type table): no other dense Linear / Conv1D / Embedding is left.
    leftovers = {n for n, m in loaded.named_modules() if type(m) in (nn.Linear, nn.Embedding, Conv1D)}
    dense = run.config.dense
    assert leftovers == set(dense) and all(reason == "would not get smaller" for reason in dense.values())
    assert len(leftovers) == (1 if arch == "bert" else 0)

    # The tie survives as one set of codes: the head reads the model's own embedding, and the file
    # holds the embedding's codes only.
    head, embedding = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    assert isinstance(head, RPQTiedHead) and head.embedding is embedding
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        head_name = next(n for n, m in loaded.named_modules() if m is head)
        assert not [k for k in handle.keys() if k.startswith(head_name + ".codebooks")]

    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(run.model(ids).logits, loaded(ids).logits)
        # and through transformers' own entry point, with nothing but `import model_compress`
        auto = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
        assert torch.equal(auto.from_pretrained(tmp_path / "out")(ids).logits, loaded(ids).logits)


def test_reported_error_is_the_decoded_weights_error():
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    outcomes = convert_model(model, RPQSettings(**SMALL), None).outcomes
    checked = 0
    for outcome in outcomes:
        name = outcome.plan.layer.name
        if name in dense and outcome.plan.layer.kind == "linear":
            rebuilt = model.get_submodule(name).dequantize()
            expected = ((dense[name] - rebuilt).norm() / dense[name].norm()).item()
            assert outcome.weight_error == pytest.approx(expected, rel=1e-5)
            assert outcome.output_error is None  # no calibration data: no output error to report
            checked += 1
    assert checked == 14  # 7 linears in each of 2 layers


def test_same_seed_gives_the_same_codes():
    first, second = tiny_model("opt"), tiny_model("opt")
    convert_model(first, RPQSettings(**SMALL, seed=3), None)
    convert_model(second, RPQSettings(**SMALL, seed=3), None)
    for (name, a), b in zip(rpq_modules(first).items(), rpq_modules(second).values(), strict=True):
        if not isinstance(a, RPQTiedHead):
            assert torch.equal(a.indices, b.indices), name


def test_gpt2_conv1d_becomes_rpq_linear_of_the_transposed_weight():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn  # Conv1D stores (in=64, out=192): x @ weight + bias
    weight_t, bias = conv.weight.detach().t().clone(), conv.bias.detach().clone()
    outcomes = convert_model(model, RPQSettings(**SMALL), None).outcomes
    rpq = model.transformer.h[0].attn.c_attn
    assert isinstance(rpq, RPQLinear) and (rpq.in_features, rpq.out_features) == (64, 192)
    assert torch.equal(rpq.bias, bias)
    reported = next(o.weight_error for o in outcomes if o.plan.layer.name == "transformer.h.0.attn.c_attn")
    assert ((rpq.dequantize() - weight_t).norm() / weight_t.norm()).item() == pytest.approx(reported, rel=1e-5)
    assert reported < 0.9


def test_nearest_divisor_rule():
    assert nearest_divisor(576, 32) == 32
    assert nearest_divisor(576, 100) == 96
    assert nearest_divisor(20, 6) == 5  # 5 and 10 are the divisors around 6; 5 is nearer
    assert nearest_divisor(12, 5) == 4  # 4 and 6 are equally near: the smaller wins
    assert nearest_divisor(7, 1000) == 7


def test_plan_reports_the_divisor_it_chose_and_why_layers_stay_dense():
    model = tiny_model("llama")
    plans = {p.layer.name: p for p in plan_layers(find_layers(model), RPQSettings(num_codebooks=13, codebook_size=16))}
    q_proj = plans["model.layers.0.self_attn.q_proj"]  # out 64: 13 does not divide it; 16 is nearest
    assert q_proj.num_codebooks == 16 and q_proj.converted
    k_proj = plans["model.layers.0.self_attn.k_proj"]  # out 32
    assert k_proj.num_codebooks == 16
    big_k = plan_layers(find_layers(model), RPQSettings(num_codebooks=8, codebook_size=256))
    reasons = {p.layer.name: p.dense_reason for p in big_k}
    # q_proj has 64 input columns: 256 codes of length 8 cost more than the weight itself.
    assert reasons["model.layers.0.self_attn.q_proj"] == "would not get smaller"
    assert reasons["model.embed_tokens"] is None  # 320 rows: the table does shrink


def test_skip_patterns_and_ties():
    model = tiny_model("llama")
    plans = plan_layers(find_layers(model), RPQSettings(**SMALL, skip=["model.layers.1.*", "down_proj"]))
    dense = {p.layer.name for p in plans if not p.converted}
    assert "model.layers.1.self_attn.q_proj" in dense and "model.layers.0.mlp.down_proj" in dense
    assert "model.layers.0.self_attn.q_proj" not in dense
    # Skipping the tied head keeps its embedding dense too: one set of weights serves both.
    plans = {p.layer.name: p for p in plan_layers(find_layers(model), RPQSettings(**SMALL, skip=["lm_head"]))}
    assert not plans["lm_head"].converted and not plans["model.embed_tokens"].converted
    assert "lm_head" in plans["model.embed_tokens"].dense_reason


def test_a_tie_left_dense_survives_the_round_trip(tmp_path, tiny_folder):
    """--skip lm_head keeps both ends dense: transformers must still save one copy and tie it on load."""
    run = compress_rpq(str(tiny_folder("llama")), tmp_path / "out", RPQSettings(**SMALL, skip=["lm_head"]), calibration=QUICK)
    assert run.config.dense["model.embed_tokens"].startswith("--skip on its tied head")
    assert run.model.config.tie_word_embeddings is True
    loaded = model_compress.load(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, run.model.lm_head.weight)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, run.model(ids).logits)


@pytest.mark.parametrize(
    "settings,message",
    [
        (RPQSettings(num_codebooks=0), "positive"),
        (RPQSettings(num_codebooks=-4), "positive"),
        (RPQSettings(num_codebooks=100_000), "larger than the dimension"),
        (RPQSettings(codebook_size=1), "--codebook-size"),
        (RPQSettings(codebook_size=65537), "--codebook-size"),
        (RPQSettings(skip=["no_such_layer"]), "matches no supported layer"),
        (RPQSettings(bits=1.0), "--bits must be above 1"),
        (RPQSettings(bits=16.5), "at most 16"),
        (RPQSettings(bits=4.0, num_codebooks=32), "not both"),
        (RPQSettings(bits=4.0, codebook_size=16), "not both"),
        (RPQSettings(codebook_bits=12), "--codebook-bits must be 8 or 16"),
        (RPQSettings(rounds=0), "--rounds"),
    ],
)
def test_impossible_settings_are_user_errors(settings, message):
    with pytest.raises(UserError, match=message):
        convert_model(tiny_model("opt"), settings, None)


@pytest.mark.parametrize("dtype, least", [(torch.float16, r"2\.75"), (torch.float32, r"3\.25")])
def test_a_budget_below_the_cheapest_formats_is_a_user_error(dtype, least):
    """An 8 x 8 layer's cheapest format (D=4, K=2, int8) stores 16 codebook bytes, 2 of codes and two scales in the
    layer's dtype (4 bytes in float16, 8 in float32) for 64 weights: 2.75 or 3.25 bits per weight, over a budget of 2."""
    with pytest.raises(UserError, match=rf"--bits 2 is below what these layers can be stored in \(at least {least} bits"):
        convert_model(nn.Sequential(nn.Linear(8, 8)).to(dtype), RPQSettings(bits=2.0), None)


def test_multihead_attention_projection_stays_dense_and_says_why():
    """nn.MultiheadAttention reads out_proj.weight itself, so its out_proj must stay a real nn.Linear."""
    model = nn.Sequential(nn.Embedding(600, 64), nn.Linear(512, 64))
    model.attention = nn.MultiheadAttention(512, 8)
    layers = {layer.name: layer.keep_dense for layer in find_layers(model)}
    assert layers == {"0": None, "1": None, "attention.out_proj": "MultiheadAttention.forward reads out_proj.weight directly"}


class ReadsItsChildsWeight(nn.Module):
    """Like T5's feed-forward: the forward casts to ``self.wo.weight.dtype`` before calling ``wo``."""

    def __init__(self) -> None:
        super().__init__()
        self.wi, self.wo = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x):
        return self.wo(self.wi(x).to(self.wo.weight.dtype))


def test_a_layer_whose_weight_its_parent_reads_stays_dense_and_the_checkpoint_says_why():
    model = nn.Sequential(ReadsItsChildsWeight())
    outcomes = convert_model(model, RPQSettings(**SMALL), None).outcomes
    reasons = {(o if isinstance(o, LayerPlan) else o.plan).layer.name: getattr(o, "dense_reason", None) for o in outcomes}
    assert reasons == {"0.wi": None, "0.wo": "ReadsItsChildsWeight.forward reads wo.weight directly"}
    assert type(model[0].wo) is nn.Linear and type(model[0].wi) is not nn.Linear
    model(torch.randn(3, 256))  # runs: the read finds a real weight


def test_model_without_supported_layers_is_a_user_error():
    with pytest.raises(UserError, match="no supported layers"):
        convert_model(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), RPQSettings(), None)


def test_nothing_to_convert_is_a_user_error():
    with pytest.raises(UserError, match="nothing to convert"):
        convert_model(tiny_model("opt"), RPQSettings(**SMALL, skip=["*"]), None)


def test_codes_above_256_are_packed_and_round_trip(tmp_path):
    config = tiny_config("llama")
    config.intermediate_size = 1024  # down_proj gets 1024 input columns: enough for K = 512 to pay
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    run = compress_rpq(str(tmp_path / "wide"), tmp_path / "out", RPQSettings(num_codebooks=8, codebook_size=512), calibration=NO_DATA)
    down = run.model.model.layers[0].mlp.down_proj
    assert isinstance(down, RPQLinear) and down.code_bits == 9 and down.indices.shape == (8, 1024 * 9 // 8)
    assert int(down.codes().max()) > 255
    loaded = model_compress.load(tmp_path / "out")
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.dequantize(), down.dequantize())
    assert run.config.dense["model.layers.0.self_attn.q_proj"] == "would not get smaller"


def test_budget_round_trip_with_packed_codes_and_int8_codebooks(tmp_path, tiny_folder):
    """--bits: every layer in its own allocated format, packed below 8 bits; save -> load -> identical logits."""
    run = compress_rpq(str(tiny_folder("llama")), tmp_path / "out", RPQSettings(bits=4.0), calibration=QUICK)
    assert 3.5 < run.summary.bits_per_weight <= 4.0
    assert run.conversion.allocation is not None and run.summary.calibration["fit_windows"] >= 1
    modules = rpq_modules(run.model)
    assert any(m.code_bits < 8 for m in modules.values() if not isinstance(m, RPQTiedHead))
    # the checkpoint is float16 and a loaded model computes in it; loaded as float32 it matches the fp32 model in memory
    loaded = model_compress.load(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, run.model(ids).logits)
        from_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
        assert torch.equal(from_hf(ids).logits, loaded(ids).logits)
        as_saved = model_compress.load(tmp_path / "out")
        scales = [b for n, b in as_saved.named_buffers() if n.endswith("codebook_scales")]
        assert as_saved(ids).logits.dtype == torch.float16 and scales and all(b.dtype == torch.float16 for b in scales)
    spec = run.config.layers["model.layers.0.mlp.down_proj"]
    layer = loaded.model.layers[0].mlp.down_proj
    assert (spec["num_codebooks"], spec["codebook_size"], spec["codebook_dtype"]) == (
        layer.num_codebooks, layer.codebook_size, layer.codebook_dtype
    )


class _WeightReadingEmbedding(nn.Embedding):
    """An embedding whose own forward reads ``self.weight`` (and is no scaled table): RPQ cannot stand in for it."""

    def forward(self, input):  # noqa: A002
        return super().forward(input) * self.weight.norm()


def test_an_embedding_whose_forward_reads_its_weight_stays_dense_with_the_reason():
    model = nn.Sequential(_WeightReadingEmbedding(600, 64), nn.Linear(64, 512))
    conversion = convert_model(model, RPQSettings(**SMALL), None)
    plans = [getattr(o, "plan", o) for o in conversion.outcomes]  # a LayerResult holds its plan; a dense layer is one
    reasons = {plan.layer.name: plan.dense_reason for plan in plans}
    assert reasons["0"] == "_WeightReadingEmbedding.forward reads .weight itself" and reasons["1"] is None
    assert isinstance(model[0], _WeightReadingEmbedding) and model[0].weight is not None


def test_rpq_layers_compute_in_the_model_dtype_whatever_their_codebooks_are_stored_in():
    """float16 codebooks of a float32 model: the embedding hands on float32 rows; after .half() float16, and back."""
    model = nn.Sequential(nn.Embedding(600, 64), nn.Linear(64, 512))
    convert_model(model, RPQSettings(**SMALL, codebook_bits=16), None)
    table = model[0]
    assert table.codebooks.dtype == torch.float16 and table(torch.tensor([[1, 2]])).dtype == torch.float32
    model.half()
    assert table(torch.tensor([[1, 2]])).dtype == torch.float16
    model.float()
    assert model(torch.tensor([[1, 2]])).dtype == torch.float32


def _offered(layer, **settings) -> list:
    """The formats a budget measures for ``layer`` under ``settings``."""
    from model_compress.rpq.plan import candidates
    from model_compress.rpq.fit.groups import FitSettings

    return candidates(layer, RPQSettings(**settings), FitSettings())


def test_a_budget_offers_linear_layers_only_formats_with_a_fast_kernel():
    """By default a Linear is offered only formats the byte-permute kernels compute (one int8 table per row, 16 or
    32 entries); --any-format offers the rest too; a budget under or above every fast format offers all; an embedding
    (and so a tied head) is the documented exception."""
    from model_compress.rpq.convert import LayerInfo
    from model_compress.rpq.kernels.config.packed_routes import byte_permute_format
    from model_compress.rpq.kernels.layout import LINEAR, column_count

    def fast(fmt, layer):
        piece = fmt.piece(layer.shape, layer.layout)
        return byte_permute_format(piece, fmt.codebook_size, fmt.codebook_dtype, column_count(layer.shape, LINEAR))

    linear = LayerInfo("mlp.up_proj", "linear", (1536, 576), torch.float16)
    offered = _offered(linear, bits=4.5)
    assert offered and all(fast(f, linear) for f in offered)
    assert {f.codebook_size for f in offered} == {16, 32}
    every = _offered(linear, bits=4.5, any_format=True)
    assert len(every) > len(offered) and not all(fast(f, linear) for f in every)
    low = _offered(linear, bits=3.0)  # 4.25 bits is the cheapest fast format here, 5.47 the dearest
    assert any(f.bits_per_weight(linear.shape, linear.layout) <= 3.0 for f in low)
    high = _offered(linear, bits=8.0)
    assert any(f.bits_per_weight(linear.shape, linear.layout) > 6.0 for f in high)
    embedding = LayerInfo("embed_tokens", "embedding", (49152, 576), torch.float16)
    assert any(f.piece(embedding.shape, embedding.layout) > 1 for f in _offered(embedding, bits=4.5))


def test_the_default_budget_converts_wide_linears_into_fast_formats():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    convert_model(model, RPQSettings(bits=4.5), None)
    assert len(rpq_modules(model)) == 2
    for layer in rpq_modules(model).values():
        assert (layer.num_codebooks, layer.codebook_dtype) == (512, "int8") and layer.codebook_size in (16, 32)


def test_the_summary_names_linear_formats_without_a_fast_kernel():
    from model_compress.rpq.summary import kernel_line

    def row(kind, size, dtype, piece=1, rotation=64, shape=(1536, 576)):
        return {"kind": kind, "shape": list(shape), "piece": piece, "codebook_size": size, "codebook_dtype": dtype,
                "rotation_block": rotation}

    rows = [row("linear", 16, "int8"), row("linear", 32, "int8"), row("conv1d", 8, "int8"), row("linear", 32, "float16"),
            row("linear", 8, "int8"), row("embedding", 128, "int8", piece=2), row("linear", 256, "float16", rotation=None)]
    line = kernel_line(rows)
    assert line.startswith("GPU kernels (fp16): 3 of 6 Linear layers in formats with fast kernels")
    assert "2 in D=1 K=8 int8, 1 in D=1 K=32 float16 take the general kernels" in line
    assert kernel_line([row("embedding", 128, "int8", piece=2)]) is None
