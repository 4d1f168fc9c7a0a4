"""Sibling packed RPQ Linears that read the same rotated tokens (q/k/v, gate/up) computed in one launch.

Siblings with equal rotations already share x R (``shared_rotation``, or the pre-norm writes it); when they also
take the same code width, the first member called with that tensor computes every member's output in one
byte-permute launch (``packed_forward.linear_group_plan``; 1 to ``NIBBLE_GROUP_TOKENS`` tokens) and the others take
theirs (``OncePerInput``). Where the launch does not apply (a prompt, a CPU, a format it does not read), each member
computes alone, as before.
A compiled graph does the same with one custom op (``packed_ops.linear_group``), which the first member traces and the
others read from the traced tensor (``layers/traced_sharing.py``). Nothing is saved with the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..kernels import packed_forward, packed_ops, plans
from ..kernels.config.packed_routes import NIBBLE_GROUP_TOKENS
from ..kernels.plans import input_signature, plans_of
from ..layers.modules import RPQLinear
from .once import OncePerInput
from .shared_input import sibling_sets
from .shared_rotation import same_rotation


class PackedGroup:
    """The members' outputs for one rotated token, computed together; None for a call the launch does not serve."""

    def __init__(self, members: list[RPQLinear]) -> None:
        self.members = members
        self.once = OncePerInput(self._outputs, len(members))
        self.once_rotating = OncePerInput(self._rotating_outputs, len(members))
        self._bias: tuple[tuple, Tensor | None] | None = None

    def output(self, member: RPQLinear, rotated: Tensor) -> Tensor | None:
        outputs = self.once(rotated)
        return None if outputs is None else outputs[self.members.index(member)]

    def output_rotating(self, member: RPQLinear, x: Tensor) -> Tensor | None:
        """The member's output from x before the members' common rotation, in one launch that rotates x as it loads it
        (1 to ``NIBBLE_GROUP_TOKENS`` tokens on CUDA); None where that does not apply (the members then rotate x once
        and call ``output``)."""
        outputs = self.once_rotating(x)
        return None if outputs is None else outputs[self.members.index(member)]

    def _outputs(self, rotated: Tensor) -> list[Tensor] | tuple[Tensor, ...] | None:
        return self._planned(rotated, None)

    def _rotating_outputs(self, x: Tensor) -> list[Tensor] | tuple[Tensor, ...] | None:
        first = self.members[0]
        return self._planned(x, (first.rotation_signs, first.rotation_block))

    def _planned(self, x: Tensor, rotation: tuple[Tensor, int] | None) -> tuple[Tensor, ...] | None:
        """The launch kept per input signature, rotation and bias state (a trained bias is joined again)."""
        if plans.usable():
            key = (rotation is not None, *input_signature(x), *self._bias_key())
            plan = plans_of(self).get(key, lambda: self._group_plan(x, rotation))
        else:
            plan = self._group_plan(x, rotation)
        return None if plan is None else plan(x)

    def traced_outputs(self, x: Tensor, rotating: bool = False) -> list[Tensor] | None:
        """Under ``torch.compile`` (the members share it through the traced tensor, ``RPQLinear._traced_sibling_output``):
        for up to ``NIBBLE_GROUP_TOKENS`` tokens, one custom op for every member (its biases added in the graph, where
        the compiler fuses each add into the member's reader); a prompt, None. ``rotating``: x comes before the
        members' rotation, which the op applies as it loads x (None where a member's format cannot)."""
        first = self.members[0]
        if x.numel() > NIBBLE_GROUP_TOKENS * first.in_features:
            return None
        if rotating and not all(m.rotates_in_load() for m in self.members):
            return None
        signs, block = (first.rotation_signs, first.rotation_block) if rotating else (None, 0)
        joined = packed_ops.linear_group(x, [m.indices for m in self.members], [m.codebooks for m in self.members],
                                         [m.codebook_scales for m in self.members], first.code_bits, first.in_features, signs,
                                         block)
        outputs = joined.split([m.out_features for m in self.members], dim=-1)
        return [out if m.bias is None else out + m.bias for out, m in zip(outputs, self.members)]

    def _group_plan(self, x: Tensor, rotation: tuple[Tensor, int] | None) -> Callable[[Tensor], tuple[Tensor, ...]] | None:
        first = self.members[0]
        members = [(m.indices, m.codebooks, m.codebook_scales) for m in self.members]
        return packed_forward.linear_group_plan(x, members, self._joined_bias(), first.code_bits, first.in_features, rotation)

    def _bias_key(self) -> tuple:
        """Where the members' biases are and how often they were written: () without biases."""
        biases = [m.bias for m in self.members]
        if biases[0] is None:
            return ()
        return tuple((b.data_ptr(), b.device, b._version) for b in biases)

    def _joined_bias(self) -> Tensor | None:
        """The members' biases end to end, joined again only when one of them changed."""
        biases = [m.bias for m in self.members]
        if biases[0] is None:
            return None
        key = self._bias_key()
        if self._bias is None or self._bias[0] != key:
            self._bias = (key, torch.cat([b.detach() for b in biases]))
        return self._bias[1]


def group_packed_siblings(model: nn.Module) -> int:
    """Give each set of rotated packed siblings with equal rotations, code widths and bias presence one PackedGroup."""
    groups = 0
    for members in sibling_sets(model, lambda layer: layer.rotated and not layer.native, _same_launch):
        group = PackedGroup(members)
        for index, layer in enumerate(members):
            layer.__dict__["_packed_group"] = group
            layer.__dict__["_group_key"] = f"group {groups}"  # what a traced graph keys the members' one op by
            layer.__dict__["_group_index"] = index
        groups += 1
    return groups


def _same_launch(a: RPQLinear, b: RPQLinear) -> bool:
    """Whether one launch can compute both: the same x R, code width, table shape and storage, bias or not."""
    return (
        same_rotation(a, b) and a.code_bits == b.code_bits and a.codebooks.shape[1:] == b.codebooks.shape[1:]
        and a.codebooks.dtype == b.codebooks.dtype and (a.codebook_scales is None) == (b.codebook_scales is None)
        and (a.codebook_scales is None or a.codebook_scales.dtype == b.codebook_scales.dtype)
        and (a.bias is None) == (b.bias is None)
    )
