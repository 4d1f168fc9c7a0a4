"""The packed forward paths as ``torch.library`` custom ops, for ``torch.compile``.

Traced directly, the paths would break the graph: they check alignment on the host, keep split-K counters between
calls and launch Triton from Python. As custom ops the compiler sees one opaque call per layer, with its output
shape from a fake implementation, and a compiled model runs the same kernels as an eager one (the torch forms off
CUDA); CUDA graphs capture them. Their outputs are contiguous, as the fake implementations say (a torch form may
hand back a transposed view). Eager calls skip the dispatcher and call ``packed_forward`` directly (``layers.modules``
picks the module), so they pay nothing for this.

No ``from __future__ import annotations`` here: ``torch.library`` reads the schema from the annotations.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import packed_forward


@torch.library.custom_op("model_compress::packed_linear", mutates_args=())
def linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], bias: Optional[Tensor], bits: int,
           in_features: int) -> Tensor:
    """``packed_forward.linear``."""
    return packed_forward.linear(x, codes, codebooks, scales, bias, bits, in_features).contiguous()


@linear.register_fake
def _linear_shape(x, codes, codebooks, scales, bias, bits, in_features):
    return x.new_empty((*x.shape[:-1], codebooks.shape[0] * codebooks.shape[2]))


@torch.library.custom_op("model_compress::packed_rotating_linear", mutates_args=())
def rotating_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], bias: Optional[Tensor], bits: int,
                    in_features: int, signs: Tensor, block: int) -> Tensor:
    """``packed_forward.rotating_linear``: a rotated layer on its input before the rotation, one launch at one token."""
    return packed_forward.rotating_linear(x, codes, codebooks, scales, bias, bits, in_features, signs, block).contiguous()


@rotating_linear.register_fake
def _rotating_linear_shape(x, codes, codebooks, scales, bias, bits, in_features, signs, block):
    return x.new_empty((*x.shape[:-1], codebooks.shape[0] * codebooks.shape[2]))


@torch.library.custom_op("model_compress::packed_gated_rotating_linear", mutates_args=())
def gated_rotating_linear(gate: Tensor, up: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor],
                          bias: Optional[Tensor], bits: int, in_features: int, signs: Tensor, block: int) -> Tensor:
    """``packed_forward.gated_rotating_linear``: down_proj on (silu(gate) * up) R, one launch at one token."""
    return packed_forward.gated_rotating_linear(gate, up, codes, codebooks, scales, bias, bits, in_features, signs,
                                                block).contiguous()


@gated_rotating_linear.register_fake
def _gated_rotating_linear_shape(gate, up, codes, codebooks, scales, bias, bits, in_features, signs, block):
    return gate.new_empty((*gate.shape[:-1], codebooks.shape[0] * codebooks.shape[2]))


@torch.library.custom_op("model_compress::packed_linear_group", mutates_args=())
def linear_group(x: Tensor, codes: List[Tensor], codebooks: List[Tensor], scales: List[Optional[Tensor]], bits: int,
                 in_features: int, signs: Optional[Tensor] = None, block: int = 0) -> Tensor:
    """``packed_forward.linear_group_joined``: sibling layers on one input, their outputs side by side (no bias: a
    traced graph adds each member's, where the compiler fuses the add into what reads it). ``signs`` and ``block``: x
    before the members' common rotation, which one token's launch applies as it loads x."""
    return packed_forward.linear_group_joined(x, list(zip(codes, codebooks, scales)), bits, in_features, signs, block)


@linear_group.register_fake
def _linear_group_shape(x, codes, codebooks, scales, bits, in_features, signs=None, block=0):
    return x.new_empty((*x.shape[:-1], sum(books.shape[0] * books.shape[2] for books in codebooks)))


@torch.library.custom_op("model_compress::packed_gated_silu_rotate", mutates_args=())
def gated_silu_rotate(gate: Tensor, up: Tensor, signs: Tensor, block: int) -> Tensor:
    """``packed_forward.gated_silu_rotate`` with SiLU: (silu(gate) * up) R, one launch on CUDA."""
    return packed_forward.gated_silu_rotate(gate, up, F.silu, signs, block).contiguous()


@gated_silu_rotate.register_fake
def _gated_silu_rotate_shape(gate, up, signs, block):
    return torch.empty_like(gate)


@torch.library.custom_op("model_compress::packed_rotate", mutates_args=())
def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """``packed_forward.rotate``: x R (signs int8 +-1 or the stored bits)."""
    return packed_forward.rotate(x, signs, block).contiguous()


@rotate.register_fake
def _rotate_shape(x, signs, block):
    return torch.empty_like(x)


@torch.library.custom_op("model_compress::packed_unrotate", mutates_args=())
def unrotate(y: Tensor, signs: Tensor, block: int) -> Tensor:
    """``packed_forward.unrotate``: y R^T."""
    return packed_forward.unrotate(y, signs, block).contiguous()


@unrotate.register_fake
def _unrotate_shape(y, signs, block):
    return torch.empty_like(y)


@torch.library.custom_op("model_compress::packed_embedding_rows", mutates_args=())
def embedding_rows(ids: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], bits: int, rows: int,
                   dtype: torch.dtype) -> Tensor:
    """``packed_forward.embedding_rows``."""
    return packed_forward.embedding_rows(ids, codes, codebooks, scales, bits, rows, dtype).contiguous()


@embedding_rows.register_fake
def _embedding_rows_shape(ids, codes, codebooks, scales, bits, rows, dtype):
    return codes.new_empty((*ids.shape, codebooks.shape[0] * codebooks.shape[2]), dtype=dtype)


@torch.library.custom_op("model_compress::packed_tied_head", mutates_args=())
def tied_head(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Optional[Tensor], bias: Optional[Tensor], bits: int,
              vocab: int) -> Tensor:
    """``packed_forward.tied_head``."""
    return packed_forward.tied_head(x, codes, codebooks, scales, bias, bits, vocab).contiguous()


@tied_head.register_fake
def _tied_head_shape(x, codes, codebooks, scales, bias, bits, vocab):
    return x.new_empty((*x.shape[:-1], vocab))
