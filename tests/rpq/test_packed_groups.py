"""Packed siblings (q/k/v, gate/up) computed in one launch: the grouping, the hand-out of each member's output, and
the fall-back to one launch each wherever the group's launch does not apply (here: a CPU)."""

from __future__ import annotations

import torch

from model_compress.rpq.fusions import apply_fusions
from model_compress.rpq.fusions.packed_groups import PackedGroup, group_packed_siblings
from model_compress.rpq.kernels import packed_forward

from ..conftest import rotated_llama


def test_siblings_with_one_rotation_and_code_width_form_one_group_each():
    model = rotated_llama()
    assert group_packed_siblings(model) == 2 * len(model.model.layers)  # q/k/v and gate/up of every layer
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    group = attention.q_proj.__dict__["_packed_group"]
    assert group.members == [attention.q_proj, attention.k_proj, attention.v_proj]
    assert "_packed_group" not in attention.o_proj.__dict__ and "_packed_group" not in mlp.down_proj.__dict__
    assert mlp.gate_proj.__dict__["_packed_group"].members == [mlp.gate_proj, mlp.up_proj]


def test_the_first_member_called_computes_all_and_each_gets_its_own(monkeypatch):
    model = rotated_llama()
    attention = model.model.layers[0].self_attn
    group = PackedGroup([attention.q_proj, attention.k_proj, attention.v_proj])
    calls = []

    def plan(x, members, bias, bits, in_features, rotation=None):
        calls.append(len(members))
        return lambda x: [torch.full((1, codebooks.shape[0]), float(i)) for i, (_, codebooks, _) in enumerate(members)]

    monkeypatch.setattr(packed_forward, "linear_group_plan", plan)
    rotated = torch.randn(1, attention.q_proj.in_features)
    outputs = [group.output(member, rotated) for member in group.members]
    assert calls == [3] and [int(out[0, 0]) for out in outputs] == [0, 1, 2]
    group.output(attention.k_proj, rotated.clone())  # another tensor: computed again
    assert calls == [3, 3]


def test_a_grouped_model_computes_what_each_layer_computes_alone_where_the_launch_does_not_apply():
    model = rotated_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        alone = model(ids).logits
        counts = apply_fusions(model)
        assert counts["packed_group"] == 2 * len(model.model.layers)
        torch.testing.assert_close(model(ids).logits, alone)


def test_siblings_behind_an_unfused_norm_compute_what_they_compute_alone():
    """With the norm left unfused, siblings get x before the rotation: they try the launch that rotates as it loads x
    (none on the CPU), then rotate it once and share it; the logits stay those of each layer alone."""
    from model_compress.rpq.kernels.config import options

    model = rotated_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        alone = model(ids).logits
        with options.using(fused_norm=False):
            apply_fusions(model)
        torch.testing.assert_close(model(ids).logits, alone)
