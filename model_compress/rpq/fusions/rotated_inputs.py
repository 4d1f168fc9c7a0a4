"""Rotated layers' x R written by the kernel that makes x: the pre-norm in front of q/k/v (gate/up, fc1), the SiLU gate
in front of down_proj.

A packed RPQ layer with an input rotation multiplies x R. Where the structure is known (the pre-norm decoder layers
of ``fusions.norm``, the SiLU-gated MLPs of ``fusions.glu``) and every reader of x is a rotated layer with the same
rotation, the norm returns norm(x) R (one launch on CUDA, where eager HF RMSNorm is seven and the rotation one more)
and its consumers take that tensor as it comes (any other tensor they are called with, they rotate themselves, so a
direct call stays correct); the MLP forms (silu(gate) * up) R in one launch and hands it to
down_proj. On the CPU the same happens with the torch forms (the norm's own forward, then the rotation), so every
device computes the same function. Under ``torch.compile`` the norm stays the model's own (the compiler fuses it with
the residual add beside it) and its readers rotate its output: one custom op writes x R for all of them (the first
reader's, shared through the traced tensor), except for up to ``NIBBLE_GROUP_TOKENS`` tokens, where their launches
rotate it as they load it (``RPQLinear.rotates_in_load``); the gate is one custom op. For as many tokens on CUDA the
gate goes further: down_proj's own launch forms (silu(gate) * up) R as it loads its input, eager and compiled. The
model's final norm is left alone: its output is the hidden state users read. Nothing is saved with the model. The
``fused_norm`` and ``fused_glu`` options switch these off too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..kernels import packed_forward, packed_ops, plans
from ..kernels.config import options
from ..kernels.config.packed_routes import NIBBLE_GROUP_TOKENS
from ..kernels.plans import input_signature, plans_of
from ..layers.modules import RPQLinear
from .glu import GATED_MLP_CLASSES, SILU_CLASSES
from .norm import known_pre_norms
from .once import write_version
from .shared_rotation import same_rotation


class RotatedOutput:
    """Which tensor a fused norm wrote last as norm(x) R: each of its ``readers`` called with that very tensor (same
    object, not written since) takes it as it comes, and the last one lets it go; any other tensor they rotate. Identity
    and a count: the activation is held only until its readers have run. A traced norm writes no x R (its readers
    share theirs through the traced tensor, ``layers/traced_sharing.py``), so this is eager only."""

    def __init__(self, readers: int) -> None:
        self.readers = readers
        self._tensor: Tensor | None = None
        self._version: int | None = None
        self._left = 0

    def mark(self, out: Tensor) -> Tensor:
        self._tensor, self._version, self._left = out, write_version(out), self.readers
        return out

    def holds(self, x: Tensor) -> bool:
        if self._tensor is None or x is not self._tensor or write_version(x) != self._version:
            return False
        self._left -= 1
        if self._left == 0:
            self._tensor = None
        return True


def rotate_in_norms(model: nn.Module) -> int:
    """Make every known pre-norm whose readers are all rotated packed layers (one rotation) write norm(x) R."""
    if not options.current().fused_norm:
        return 0
    fused = 0
    for norm, consumers, spec in known_pre_norms(model):
        if spec is None or norm._forward_hooks or norm._forward_pre_hooks or not _rotated_alike(consumers, spec.weight.numel()):
            continue
        written = RotatedOutput(len(consumers))
        norm.forward = functools.partial(_rotated_norm_forward, norm.forward, spec, getattr(norm, "bias", None), consumers, written)
        for consumer in consumers:
            consumer.__dict__["_rotated_by"] = written
        fused += 1
    return fused


def _rotated_alike(layers: list, width: int) -> bool:
    """All packed RPQ Linears, rotated the same way, reading ``width`` features."""
    return all(
        isinstance(layer, RPQLinear) and not layer.native and layer.rotated and layer.in_features == width
        and same_rotation(layers[0], layer)
        for layer in layers
    )


def _rotated_norm_forward(own_forward: Callable[[Tensor], Tensor], spec, bias: Tensor | None, readers: list[RPQLinear],
                          written: RotatedOutput, x: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        # the norm as the model writes it (fused with what the compiler puts beside it); its readers rotate its output,
        # as they load it (1 to NIBBLE_GROUP_TOKENS tokens) or in one op they share through the traced tensor
        # (layers/traced_sharing.py): nothing here reaches the readers, which a compiled call would check on the host
        return own_forward(x)
    if any(reader.decoded is not None for reader in readers):  # decoded weights take the plain input
        return own_forward(x)
    first = readers[0]
    if plans.usable():
        run = plans_of(written).get(input_signature(x), lambda: packed_forward.norm_rotate_plan(
            x, own_forward, spec.weight, bias, spec.eps, spec.kind, first.signs(spec.weight.dtype), first.rotation_block))
        return written.mark(run(x))
    out = packed_forward.norm_rotate(x, own_forward, spec.weight, bias, spec.eps, spec.kind, first.signs(spec.weight.dtype),
                                     first.rotation_block)
    return written.mark(out)


def rotate_in_gated_mlps(model: nn.Module) -> int:
    """Route every SiLU-gated MLP whose down_proj is a rotated packed layer through ``rotated_gated_mlp_forward``."""
    if not options.current().fused_glu:
        return 0
    fused = 0
    for mlp in model.modules():
        down = getattr(mlp, "down_proj", None)
        if (
            type(mlp).__name__ in GATED_MLP_CLASSES
            and type(getattr(mlp, "act_fn", None)).__name__ in SILU_CLASSES
            and _rotated_alike([down], getattr(getattr(mlp, "up_proj", None), "out_features", -1))
        ):
            mlp.forward = functools.partial(rotated_gated_mlp_forward, mlp)
            fused += 1
    return fused


def rotated_gated_mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) with the product and down_proj's rotation made in one step: for a
    few tokens inside down_proj's own launch, as it loads its input (``packed_forward.gated_rotating_linear_plan``),
    else in one launch before it."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    down = mlp.down_proj
    # a hook must see down's own input; a decoded down_proj takes the plain product
    if down._forward_hooks or down._forward_pre_hooks or down.decoded is not None:
        return down(mlp.act_fn(gate) * up)
    in_load = (down.indices, down.codebooks, down.codebook_scales, down.bias, down.code_bits, down.in_features,
               down.rotation_signs, down.rotation_block)
    if torch.compiler.is_compiling():  # one custom op, reading the stored sign bits
        if gate.numel() <= NIBBLE_GROUP_TOKENS * down.in_features and down.rotates_in_load():
            return packed_ops.gated_rotating_linear(gate, up, *in_load)
        return down.forward_rotated(packed_ops.gated_silu_rotate(gate, up, down.rotation_signs, down.rotation_block))
    if plans.usable():
        signature = (*input_signature(gate), *input_signature(up))
        fused = plans_of(down).get(("silu in load", *signature), lambda: packed_forward.gated_rotating_linear_plan(gate, up, *in_load))
        if fused is not None:
            return fused(gate, up)
        run = plans_of(down).get(("silu", *signature), lambda: packed_forward.gated_silu_rotate_plan(
            gate, up, mlp.act_fn, down.signs(gate.dtype), down.rotation_block))
        return down.forward_rotated(run(gate, up))
    fused = packed_forward.gated_rotating_linear_plan(gate, up, *in_load)
    if fused is not None:
        return fused(gate, up)
    return down.forward_rotated(packed_forward.gated_silu_rotate(gate, up, mlp.act_fn, down.signs(gate.dtype), down.rotation_block))
