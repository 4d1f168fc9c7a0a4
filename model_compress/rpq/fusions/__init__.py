"""Fusions of RPQ layers with their neighbours (shared input, shared rotation, pre-norm, SiLU gate, the rotation
written by the norm or the gate, packed siblings in one launch).

``apply_fusions`` is the one call: the loader makes it after the weights arrive, and ``compress_rpq``
after converting, so a model runs the same whether it was just made or loaded. None of them changes
what is saved.
"""

from __future__ import annotations

from torch import nn

from .glu import fuse_gated_mlps
from .norm import defer_norms
from .packed_groups import group_packed_siblings
from .rotated_inputs import rotate_in_gated_mlps, rotate_in_norms
from .shared_input import group_shared_inputs
from .shared_rotation import share_rotations


def apply_fusions(model: nn.Module) -> dict[str, int]:
    """Every fusion the options allow, in the order they build on each other; how many places each took."""
    return {
        "shared_input": group_shared_inputs(model),
        "shared_rotation": share_rotations(model),
        "norm": defer_norms(model),
        "glu": fuse_gated_mlps(model),
        "rotated_norm": rotate_in_norms(model),
        "rotated_glu": rotate_in_gated_mlps(model),
        "packed_group": group_packed_siblings(model),
    }
