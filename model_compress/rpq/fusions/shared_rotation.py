"""Sibling RPQ layers with the same input rotation (q/k/v, gate/up) rotate their shared input once.

A conversion draws one rotation per input width, so layers that read the same tensor carry equal signs and
blocks. Here each set of such siblings gets one ``OncePerInput``: the first member called with a tensor computes
x R, the others take it. Members called on different tensors each compute their own, so a model that calls them
differently stays correct. Nothing is saved with the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.modules import RPQLinear
from .once import OncePerInput
from .shared_input import sibling_sets


def share_rotations(model: nn.Module) -> int:
    """Give each set of sibling RPQ Linears with equal rotations one shared x R; returns how many sets."""
    shared = 0
    for members in sibling_sets(model, lambda layer: layer.rotated, same_rotation):
        once = OncePerInput(members[0].rotate_alone, len(members))
        for layer in members:
            layer.__dict__["_shared_rotation"] = once
            layer.__dict__["_rotation_key"] = f"rotation {shared}"  # what a traced graph keys the shared x R by
        shared += 1
    return shared


def same_rotation(a: RPQLinear, b: RPQLinear) -> bool:
    """Equal blocks and equal signs on the same device: the two layers multiply the same x R."""
    return (
        a.rotation_block == b.rotation_block
        and a.rotation_signs.shape == b.rotation_signs.shape
        and a.rotation_signs.device == b.rotation_signs.device
        and bool(torch.equal(a.rotation_signs, b.rotation_signs))  # the packed bits: equal bits, equal signs
    )
