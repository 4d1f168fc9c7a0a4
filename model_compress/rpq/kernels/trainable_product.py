"""x W'^T + b from packed codes while autograd records (fine-tuning), keeping only what the layer stores anyway.

Decoding W' with a gather and multiplying with ``F.linear`` makes autograd keep, for every layer of a training step,
the codes as int64 for the gather's backward (8 bytes a code) and, under autocast, a 16-bit copy of W' for the
product's backward (2 bytes a weight): 65 GB for a 7B-class model's 6.5 B weights, more than its activations. This
product keeps the packed codes (already in memory), the codebook values and the input, and decodes W' again in the
backward pass: grad x = grad y W', grad W' = grad y^T x, whose pieces are summed into the codebook entries their codes
name (an ``index_add_``, as the gather's own backward does). The gradients are the ones the decode-and-multiply gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import EMBEDDING, LINEAR, decode, to_pieces, unpack_codes


class _PackedProduct(torch.autograd.Function):
    """y = x W^T + b with W decoded from (values, packed codes) in ``layout`` (LINEAR: W is (out, in); EMBEDDING: the
    table, (rows, dim), as a tied head uses it)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, packed: Tensor, bits: int, columns: int,
                layout: str) -> Tensor:
        weight = decode(values, unpack_codes(packed, bits, columns), layout).to(x.dtype)
        ctx.save_for_backward(x, values, packed)
        ctx.layout, ctx.bits, ctx.columns, ctx.has_bias = layout, bits, columns, bias is not None
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, values, packed = ctx.saved_tensors
        codes = unpack_codes(packed, ctx.bits, ctx.columns)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = decode(values, codes, ctx.layout).to(grad.dtype)
            grad_x = (grad @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows = grad.reshape(-1, grad.shape[-1])
            grad_weight = rows.transpose(0, 1) @ x.reshape(-1, x.shape[-1]).to(grad.dtype)  # (out, in)
            grad_values = _summed_by_code(grad_weight, codes, values, ctx.layout)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_values, grad_bias, None, None, None, None


def _summed_by_code(grad_weight: Tensor, codes: Tensor, values: Tensor, layout: str) -> Tensor:
    """The gradient of each codebook entry: the sum of the weight gradient's pieces that its code names."""
    num_codebooks, codebook_size, piece = values.shape
    pieces = to_pieces(grad_weight.to(values.dtype), num_codebooks, layout)  # (M, n, D)
    offsets = torch.arange(num_codebooks, device=codes.device)[:, None] * codebook_size
    summed = torch.zeros(num_codebooks * codebook_size, piece, device=values.device, dtype=values.dtype)
    summed.index_add_(0, (codes + offsets).reshape(-1), pieces.reshape(-1, piece))
    return summed.reshape(values.shape)


def trainable_linear(x: Tensor, values: Tensor, packed: Tensor, bits: int, in_features: int, bias: Tensor | None) -> Tensor:
    """x W'^T + b for a packed Linear (W' (out, in), its codes one column per input), in the autocast dtype where
    autocast is on (as ``F.linear`` would compute it), else in x's."""
    return _PackedProduct.apply(_compute_input(x), values, bias, packed, bits, in_features, LINEAR)


def trainable_tied_head(x: Tensor, values: Tensor, packed: Tensor, bits: int, vocab: int, bias: Tensor | None) -> Tensor:
    """Logits of x against a packed embedding table of ``vocab`` rows (a tied head), as ``trainable_linear``."""
    return _PackedProduct.apply(_compute_input(x), values, bias, packed, bits, vocab, EMBEDDING)


def records(*tensors: Tensor | None) -> bool:
    """Whether autograd records a product of these tensors (grad on, and one of them requires it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compute_input(x: Tensor) -> Tensor:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x
