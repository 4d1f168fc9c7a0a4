"""SiLU-gated MLPs (quantize/fused_glu.py): which MLPs are fused, and that every non-fused call is unchanged."""

from __future__ import annotations

import torch
from torch import nn

from ..conftest import native_rpq, tiny_model
from model_compress.rpq.kernels import forward as kernels
from model_compress.rpq.kernels.config import options
from model_compress.rpq.fusions.glu import fuse_gated_mlps
from model_compress.rpq.fusions.shared_input import group_shared_inputs


def rpq_llama() -> nn.Module:
    model = tiny_model("llama")
    native_rpq(model)
    return model


def test_gated_mlps_are_fused_and_logits_stay_the_same():
    model = rpq_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    keys = list(model.state_dict())
    with torch.inference_mode():
        before = model(ids).logits
    group_shared_inputs(model)
    assert fuse_gated_mlps(model) == model.config.num_hidden_layers
    assert "forward" in vars(model.model.layers[0].mlp)  # the instance's forward, not the class's
    with torch.inference_mode():
        after = model(ids).logits
    assert list(model.state_dict()) == keys
    assert torch.equal(before, after)  # CPU: the kernel route does not apply, the MLP's own expression runs


def test_fused_mlp_hands_gate_and_up_to_down_proj(monkeypatch):
    """Where the kernel route applies, down_proj gets gate and up (no activation, no product); else the expression."""
    model = rpq_llama()
    fuse_gated_mlps(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        expected = mlp.down_proj(nn.functional.silu(gate) * up)
    calls = []

    def fake(gate_in, up_in, codebooks, bias, bins, routes=None):
        calls.append((gate_in, up_in, codebooks))
        return torch.full((1, 1, mlp.down_proj.out_features), 7.0)

    monkeypatch.setattr(kernels, "gated_linear_forward", fake)
    with torch.no_grad():
        out = mlp(x)
    assert len(calls) == 1 and calls[0][2] is mlp.down_proj.codebooks
    assert torch.equal(calls[0][0], gate) and torch.equal(calls[0][1], up)
    assert torch.equal(out, torch.full_like(out, 7.0))

    handle = mlp.down_proj.register_forward_pre_hook(lambda module, args: None)  # a hook must see down's input
    with torch.no_grad():
        hooked = mlp(x)
    handle.remove()
    assert len(calls) == 1 and torch.allclose(hooked, expected)

    monkeypatch.setattr(kernels, "gated_linear_forward", lambda *args, **kwargs: None)  # route does not apply
    with torch.no_grad():
        assert torch.allclose(mlp(x), expected)


def test_switch_other_activations_and_dense_layers_leave_the_mlps_alone(monkeypatch):
    with options.using(fused_glu=False):
        assert fuse_gated_mlps(rpq_llama()) == 0

    model = rpq_llama()
    model.model.layers[0].mlp.act_fn = nn.GELU()  # not SiLU
    dense = model.model.layers[1].mlp
    dense.down_proj = nn.Linear(dense.down_proj.in_features, dense.down_proj.out_features, bias=False)
    assert fuse_gated_mlps(model) == model.config.num_hidden_layers - 2
    assert "forward" not in vars(model.model.layers[0].mlp) and "forward" not in vars(dense)

    opt = tiny_model("opt")  # no gated MLP module at all
    native_rpq(opt)
    assert fuse_gated_mlps(opt) == 0
