"""Deferred pre-norms (quantize/fused_norm.py): which norms are deferred, and that every non-fused path is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ..conftest import native_rpq, tiny_model
from model_compress.rpq.kernels import forward as kernels
from model_compress.rpq.kernels.config import options
from model_compress.rpq.fusions.norm import DeferredNorm, defer_norms
from model_compress.rpq.layers.modules import RPQLinear
from model_compress.rpq.kernels.config.norm_spec import LAYER_NORM, RMS_NORM
from model_compress.rpq.fusions.shared_input import group_shared_inputs


def rpq_model(arch: str) -> nn.Module:
    model = tiny_model(arch)
    native_rpq(model)
    for module in model.modules():  # non-trivial norm weights and biases, so a dropped one would show
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("arch, kind", [("llama", RMS_NORM), ("opt", LAYER_NORM)])
def test_pre_norms_are_deferred_and_logits_stay_the_same(arch, kind):
    model = rpq_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    keys = list(model.state_dict())
    with torch.inference_mode():
        before = model(ids).logits
    group_shared_inputs(model)
    deferred = defer_norms(model)
    assert deferred == 2 * model.config.num_hidden_layers  # attention and MLP pre-norm of every layer
    layer = model.model.layers[0] if arch == "llama" else model.model.decoder.layers[0]
    norm = layer.input_layernorm if arch == "llama" else layer.self_attn_layer_norm
    x = torch.randn(3, model.config.hidden_size)
    assert norm(x) is x  # the norm now passes its input through ...
    normed = layer.self_attn.q_proj.__dict__["_normed_input"]
    assert isinstance(normed.norm, DeferredNorm) and normed.norm.spec.kind == kind
    assert normed.norm is layer.self_attn.v_proj.__dict__["_normed_input"].norm  # ... q, k and v normalise it
    if kind == LAYER_NORM:  # the kernel's bias: the layer's own plus W beta
        q = layer.self_attn.q_proj
        expected = q.dequantize().float() @ norm.bias.float() + q.bias.float()
        assert torch.allclose(normed.fused_bias.float(), expected, atol=1e-4)
    with torch.inference_mode():
        after = model(ids).logits
    assert list(model.state_dict()) == keys
    assert torch.equal(before, after)  # CPU: every consumer calls the norm's own forward
    assert not normed.norm.holding  # nothing kept past the layer


def test_norm_output_computed_once_for_its_consumers(monkeypatch):
    model = rpq_model("llama")
    defer_norms(model)
    layer = model.model.layers[0]
    calls = []
    once = layer.self_attn.q_proj.__dict__["_normed_input"].norm._once  # fusions.once.OncePerInput
    forward = once.compute
    monkeypatch.setattr(once, "compute", lambda x: calls.append(1) or forward(x))
    x = torch.randn(1, 4, model.config.hidden_size)
    with torch.inference_mode():
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj(layer.input_layernorm(x))
        assert len(calls) == 1
        layer.self_attn.q_proj(x.clone())  # another tensor: computed again
    assert len(calls) == 2


def test_post_norm_opt_and_switch_leave_the_norms_alone(monkeypatch):
    model = rpq_model("opt")
    for layer in model.model.decoder.layers:
        layer.do_layer_norm_before = False  # OPT-350m: the norm output is the residual stream
    assert defer_norms(model) == 0
    with options.using(fused_norm=False):
        assert defer_norms(rpq_model("llama")) == 0


def test_norms_stay_when_a_consumer_is_not_rpq():
    model = tiny_model("llama")
    native_rpq(model)
    layer = model.model.layers[0]
    layer.mlp.up_proj = nn.Linear(layer.mlp.up_proj.in_features, layer.mlp.up_proj.out_features)  # a layer left dense
    defer_norms(model)
    x = torch.randn(2, model.config.hidden_size)
    assert not torch.equal(layer.post_attention_layernorm(x), x)
    assert "_normed_input" not in layer.mlp.gate_proj.__dict__
    assert torch.equal(layer.input_layernorm(x), x)  # the attention norm of the same layer is still deferred
    assert isinstance(layer.self_attn.q_proj, RPQLinear)
    assert kernels.gpu_kernels(x) is None
