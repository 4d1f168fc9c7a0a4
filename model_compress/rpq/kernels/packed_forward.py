"""Forward paths of the packed RPQ forms (b-bit codes, int8 or float codebooks, the input rotation): the Triton
kernels of ``kernels/packed`` on CUDA, the torch forms of ``kernels/forward.py`` everywhere else.

Each function takes plain tensors (the modules hand over their buffers), so the routing is testable without a
model. On CUDA the weight is never decoded whole for a few tokens; prompts of 4/5-bit row tables take one launch
that looks W' up in registers for the tensor cores (up to ``NIBBLE_PROMPT_MAX_TOKENS``, and small layers beyond),
other prompts decode one layer's W' into a temporary, multiply it with cuBLAS and drop it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import forward as torch_forms
from . import rotation
from .config import options
from .config.packed_routes import (HEAD_CHUNK_BYTES, HEAD_FUSED_TOKENS, HEAD_SCORE_TOKENS, NIBBLE_GROUP_TOKENS, NIBBLE_GROUPS,
                                   NIBBLE_ROUTED_BITS, NIBBLE_ROUTED_DTYPES, NIBBLE_ROUTES, nibble_prompt_tile, packed_tile)
from .layout import LINEAR, codebook_values, decode as decode_dense, unpack_codes
from .trainable_product import records, trainable_linear, trainable_tied_head


@functools.cache
def _imported_packed_kernels():
    try:
        from . import packed
    except ImportError:
        return None
    return packed


def packed_kernels(tensor: Tensor, *trained: Tensor | None):
    """The packed Triton kernels when ``tensor`` is on CUDA, Triton imports and the ``triton`` option is on; else None.

    The kernels have no backward: where autograd records (fine-tuning: grad on and any of ``tensor`` and
    ``trained`` requiring it), the torch forms run instead.
    """
    if tensor.device.type != "cuda" or not options.current().triton:
        return None
    if records(tensor, *trained):
        return None
    return _imported_packed_kernels()


def programmatic(kernels, device: torch.device) -> bool:
    """Whether decode kernels launch as programmatic dependents (``triton.common._wait_for_inputs``): the
    ``programmatic_launch`` option on and a GPU that has it. Their launch then overlaps the end of the kernel before,
    and a layer's weights load meanwhile: at one token most of a small layer's time."""
    return options.current().programmatic_launch and kernels.programmatic_launch_supported(device)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sign_values(signs: Tensor) -> Tensor:
    """int8 +-1 signs from either form a rotation's signs travel in: int8 +-1 already, or the stored bits (uint8)."""
    return rotation.unpack_signs(signs) if signs.dtype == torch.uint8 else signs


def rotate_plan(x: Tensor, signs: Tensor, block: int, signs_first: bool = True) -> Callable[[Tensor], Tensor]:
    """x R (``signs_first``) or y R^T for inputs like ``x``: one Triton launch on CUDA, the torch form elsewhere.
    ``signs``: (width,) int8 +-1, or the (width / 8,) uint8 bits the layer stores (the kernels read them as they are)."""
    kernels = packed_kernels(x)
    if kernels is None:
        form, values = (rotation.rotate if signs_first else rotation.unrotate), sign_values(signs)
        return lambda x: form(x, values, block)
    return kernels.rotate_plan(x, signs, block, signs_first, programmatic(kernels, x.device))


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """x R: one Triton launch on CUDA, the torch form elsewhere. ``signs``: int8 +-1 or the stored bits."""
    return rotate_plan(x, signs, block)(x)


def unrotate(y: Tensor, signs: Tensor, block: int) -> Tensor:
    """y R^T: one Triton launch on CUDA, the torch form elsewhere."""
    return rotate_plan(y, signs, block, signs_first=False)(y)


def norm_rotate_plan(x: Tensor, norm_forward, weight: Tensor, bias: Tensor | None, eps: float, kind: int, signs: Tensor,
                     block: int) -> Callable[[Tensor], Tensor]:
    """norm(x) R for inputs like ``x``: one Triton launch on CUDA; elsewhere the norm's own ``norm_forward``, then the
    torch rotation."""
    kernels = packed_kernels(x, weight, bias)
    if kernels is None:
        values = sign_values(signs)
        return lambda x: rotation.rotate(norm_forward(x), values, block)
    run = kernels.norm_rotate_plan(x, weight, bias, eps, kind, signs, block, programmatic(kernels, x.device))
    return lambda x: run(x, None)


def norm_rotate(x: Tensor, norm_forward, weight: Tensor, bias: Tensor | None, eps: float, kind: int, signs: Tensor,
                block: int) -> Tensor:
    """norm(x) R: one Triton launch on CUDA; elsewhere the norm's own ``norm_forward``, then the torch rotation."""
    return norm_rotate_plan(x, norm_forward, weight, bias, eps, kind, signs, block)(x)


def gated_silu_rotate_plan(gate: Tensor, up: Tensor, act_fn, signs: Tensor, block: int) -> Callable[[Tensor, Tensor], Tensor]:
    """(act_fn(gate) * up) R with act_fn SiLU for inputs like ``gate`` and ``up``: one Triton launch on CUDA; elsewhere
    the expression, then the rotation."""
    kernels = packed_kernels(gate, up)
    if kernels is None:
        values = sign_values(signs)
        return lambda gate, up: rotation.rotate(act_fn(gate) * up, values, block)
    return kernels.gated_silu_rotate_plan(gate, up, signs, block, programmatic(kernels, gate.device))


def gated_silu_rotate(gate: Tensor, up: Tensor, act_fn, signs: Tensor, block: int) -> Tensor:
    """(act_fn(gate) * up) R with act_fn SiLU: one Triton launch on CUDA; elsewhere the expression, then the rotation."""
    return gated_silu_rotate_plan(gate, up, act_fn, signs, block)(gate, up)


def linear_plan(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
                in_features: int) -> Callable[[Tensor], Tensor]:
    """x W'^T + b for inputs like ``x`` (in the layer's rotated basis), from packed codes: the route (kernel and tile by
    token count, or decode + cuBLAS) picked here, once."""
    kernels = packed_kernels(x, codebooks, scales, bias)
    if kernels is None:
        def torch_form(x: Tensor) -> Tensor:
            many = not torch_forms.histogram_serves(x.numel() // in_features, codebooks)
            if many and records(x, codebooks, scales, bias):  # fine-tuning: keep the packed codes, not int64 ones and W'
                return trainable_linear(x, codebook_values(codebooks, scales), codes, bits, in_features, bias)
            values = codebook_values(codebooks, scales, x.dtype)
            return torch_forms.linear_torch(x, values, unpack_codes(codes, bits, in_features), bias)

        return torch_form
    tokens = x.numel() // in_features
    tile = packed_tile(tokens)
    nibbles = bits in NIBBLE_ROUTED_BITS
    sms = multiprocessors(x.device)
    if tile is not None and nibbles and _routed_dtype(x) and kernels.nibble_serves(x, codes, codebooks, scales, bits, in_features):
        return kernels.nibble_linear_plan(x, codes, codebooks, scales, bias, bits, in_features,
                                          packed_tile(tokens, NIBBLE_ROUTES), sms, programmatic(kernels, x.device))
    if tile is not None:
        return kernels.packed_linear_plan(x, codes, codebooks, scales, bias, bits, in_features, tile, sms)
    prompt_tile = nibble_prompt_tile(tokens, in_features, codebooks.shape[0]) if options.current().fused_prompts else None
    if nibbles and prompt_tile is not None and kernels.nibble_prompt_serves(x, codes, codebooks, scales, bits, in_features):
        return kernels.nibble_prompt_plan(x, codes, codebooks, scales, bias, bits, in_features, prompt_tile)
    if nibbles and kernels.nibble_decode_serves(codes, codebooks, scales, bits, in_features):
        weight = kernels.nibble_decode_plan(codes, codebooks, scales, bits, in_features, x.dtype)
    else:
        weight = kernels.decode_linear_plan(codes, codebooks, scales, bits, in_features, x.dtype)
    return lambda x: F.linear(x, weight(), bias)


def _rotating_route(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
                    in_features: int, block: int):
    """(kernels, tile) of the launch that rotates tokens like ``x`` in blocks of ``block`` as it loads them, or None where
    it does not apply (not 1 to ``NIBBLE_GROUP_TOKENS`` fp16 or bf16 tokens on CUDA, a format or block it does not read)."""
    tokens = x.numel() // in_features
    if (not options.current().rotate_in_load or not 1 <= tokens <= NIBBLE_GROUP_TOKENS or bits not in NIBBLE_ROUTED_BITS
            or not _routed_dtype(x)):
        return None
    tile = packed_tile(tokens, NIBBLE_ROUTES)
    kernels = packed_kernels(x, codebooks, scales, bias)
    if (kernels is None or not kernels.rotates_in_load(block, tile)
            or not kernels.nibble_serves(x, codes, codebooks, scales, bits, in_features)):
        return None
    return kernels, tile


def rotating_linear_plan(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
                         in_features: int, signs: Tensor, block: int) -> Callable[[Tensor], Tensor] | None:
    """(x R) W'^T + b for tokens like ``x``, given before the layer's rotation, in one launch that rotates x as it loads
    it (``packed/nibble_products.py``): the rotation's own launch saved. None where that launch does not apply
    (``_rotating_route``): the caller rotates first. ``signs``: the stored bits or +-1 values."""
    route = _rotating_route(x, codes, codebooks, scales, bias, bits, in_features, block)
    if route is None:
        return None
    kernels, tile = route
    return kernels.nibble_linear_plan(x, codes, codebooks, scales, bias, bits, in_features, tile, multiprocessors(x.device),
                                      programmatic(kernels, x.device), rotation=(signs, block))


def rotating_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
                    in_features: int, signs: Tensor, block: int) -> Tensor:
    """(x R) W'^T + b for x before the layer's rotation: one launch where ``rotating_linear_plan`` applies, else the
    rotation and then the layer."""
    plan = rotating_linear_plan(x, codes, codebooks, scales, bias, bits, in_features, signs, block)
    if plan is not None:
        return plan(x)
    return linear(rotate(x, signs, block), codes, codebooks, scales, bias, bits, in_features)


def gated_rotating_linear_plan(gate: Tensor, up: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None,
                               bias: Tensor | None, bits: int, in_features: int, signs: Tensor,
                               block: int) -> Callable[[Tensor, Tensor], Tensor] | None:
    """((silu(gate) * up) R) W'^T + b for tokens like ``gate`` and ``up`` (a SiLU-gated MLP's down projection) in one
    launch that forms the product and rotates it as it loads it: the SiLU prologue's launch saved. None where that
    launch does not apply (``_rotating_route``, or ``up`` not shaped, strided and aligned as ``gate``)."""
    rows_gate, rows_up = gate.reshape(-1, in_features), up.reshape(-1, in_features)
    if (up.shape != gate.shape or rows_gate.data_ptr() != gate.data_ptr() or rows_up.data_ptr() != up.data_ptr()
            or rows_gate.stride() != rows_up.stride() or up.data_ptr() % 16 != gate.data_ptr() % 16):
        return None  # the kernel reads both as rows at one stride
    route = _rotating_route(gate, codes, codebooks, scales, bias, bits, in_features, block)
    if route is None:
        return None
    kernels, tile = route
    return kernels.nibble_linear_plan(gate, codes, codebooks, scales, bias, bits, in_features, tile, multiprocessors(gate.device),
                                      programmatic(kernels, gate.device), rotation=(signs, block), gated=True)


def gated_rotating_linear(gate: Tensor, up: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None,
                          bias: Tensor | None, bits: int, in_features: int, signs: Tensor, block: int) -> Tensor:
    """((silu(gate) * up) R) W'^T + b: one launch where ``gated_rotating_linear_plan`` applies, else the SiLU prologue's
    launch and then the layer."""
    plan = gated_rotating_linear_plan(gate, up, codes, codebooks, scales, bias, bits, in_features, signs, block)
    if plan is not None:
        return plan(gate, up)
    return linear(gated_silu_rotate(gate, up, F.silu, signs, block), codes, codebooks, scales, bias, bits, in_features)


def _routed_dtype(x: Tensor) -> bool:
    """Whether tokens of ``x``'s dtype go to the byte-permute kernels for 1-64 tokens (``NIBBLE_ROUTED_DTYPES``)."""
    return str(x.dtype).removeprefix("torch.") in NIBBLE_ROUTED_DTYPES


def linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
           in_features: int) -> Tensor:
    """x W'^T + b for x in the layer's (rotated) basis, from packed codes."""
    return linear_plan(x, codes, codebooks, scales, bias, bits, in_features)(x)


def joined_group_plan(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor | None]], bias: Tensor | None, bits: int,
                      in_features: int, rotation: tuple[Tensor, int] | None = None) -> Callable[[Tensor], Tensor] | None:
    """Each member's (codes, codebooks, scales) times tokens like ``x`` in one launch, plus ``bias`` (the members'
    biases end to end), the outputs side by side in one tensor; None where that launch does not apply (not 1 to
    ``NIBBLE_GROUP_TOKENS`` fp16 or bf16 tokens on CUDA, a member the byte-permute kernels do not read), and the members
    then compute alone. ``rotation`` (signs, block): x comes before the members' common rotation, which the launch
    applies as it loads x (None where it cannot)."""
    tokens = x.numel() // in_features
    if not NIBBLE_GROUPS or bits not in NIBBLE_ROUTED_BITS or not 1 <= tokens <= NIBBLE_GROUP_TOKENS or not _routed_dtype(x):
        return None
    kernels = packed_kernels(x, bias, *[t for member in members for t in member])
    if kernels is None or not all(kernels.nibble_serves(x, c, b, s, bits, in_features) for c, b, s in members):
        return None
    tile = packed_tile(tokens, NIBBLE_ROUTES)
    if rotation is not None and (not options.current().rotate_in_load or not kernels.rotates_in_load(rotation[1], tile)):
        return None
    return kernels.nibble_group_plan(x, members, bias, bits, in_features, tile, multiprocessors(x.device),
                                     programmatic(kernels, x.device), rotation)


def linear_group_plan(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor | None]], bias: Tensor | None, bits: int,
                      in_features: int, rotation: tuple[Tensor, int] | None = None) -> Callable[[Tensor], tuple[Tensor, ...]] | None:
    """``joined_group_plan`` handing back each member's output (views of the one tensor), or None."""
    joined = joined_group_plan(x, members, bias, bits, in_features, rotation)
    if joined is None:
        return None
    widths = [codebooks.shape[0] * codebooks.shape[2] for _, codebooks, _ in members]
    return lambda x: joined(x).split(widths, dim=-1)


def linear_group_joined(x: Tensor, members: list[tuple[Tensor, Tensor, Tensor | None]], bits: int, in_features: int,
                        signs: Tensor | None = None, block: int = 0) -> Tensor:
    """The members' outputs (no bias) side by side in one tensor: one launch where ``joined_group_plan`` applies, else
    each member alone. What a compiled graph calls for siblings (``packed_ops.linear_group``) on up to
    ``NIBBLE_GROUP_TOKENS`` tokens. ``signs`` and ``block``: x comes before the members' common rotation (rotated in the
    launch's load where it can, else first)."""
    rotation = None if signs is None else (signs, block)
    joined = joined_group_plan(x, members, None, bits, in_features, rotation)
    if joined is not None:
        return joined(x)
    if rotation is not None:
        return linear_group_joined(rotate(x, signs, block), members, bits, in_features)
    return torch.cat([linear(x, codes, codebooks, scales, None, bits, in_features) for codes, codebooks, scales in members], -1)


def linear_reference(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
                     in_features: int) -> Tensor:
    """The definition the kernels are checked against: W' decoded whole in float32, one ``F.linear`` in float32."""
    weight = decode_dense(codebook_values(codebooks, scales, torch.float32), unpack_codes(codes, bits, in_features), LINEAR)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


def embedding_rows_plan(ids: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, rows: int,
                        dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """Rows of a packed table E' of ``rows`` rows (before any unrotation) for ids shaped like ``ids``, (*ids.shape, dim)
    in ``dtype``."""
    kernels = packed_kernels(codes, codebooks, scales)
    if kernels is None:
        return lambda ids: torch_forms.embedding_torch(ids, codebook_values(codebooks, scales, dtype),
                                                       unpack_codes(codes, bits, rows, ids))
    dim = codebooks.shape[0] * codebooks.shape[2]
    count, shape, device = ids.numel(), (*ids.shape, dim), codes.device
    decode = kernels.decode_plan(codes, codebooks, scales, bits, rows, dim, 1, count, has_ids=True)

    def picked(ids: Tensor) -> Tensor:
        out = torch.empty(shape, device=device, dtype=dtype)
        decode(out, ids.reshape(-1))
        return out

    return picked


def embedding_rows(ids: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bits: int, rows: int,
                   dtype: torch.dtype) -> Tensor:
    """Rows ``ids`` of a packed table E' of ``rows`` rows (before any unrotation), (*ids.shape, dim) in ``dtype``."""
    return embedding_rows_plan(ids, codes, codebooks, scales, bits, rows, dtype)(ids)


def tied_head_plan(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
                   vocab: int) -> Callable[[Tensor], Tensor]:
    """Logits of rotated hidden states shaped like ``x`` against a packed table of ``vocab`` rows: on CUDA the table
    decoded in chunks of at most ``HEAD_CHUNK_BYTES`` for cuBLAS (one chunk alive at a time), the score route up to
    ``HEAD_SCORE_TOKENS`` tokens, or the fused kernel up to ``HEAD_FUSED_TOKENS`` tokens."""
    kernels = packed_kernels(x, codebooks, scales, bias)
    if kernels is None:
        def torch_form(x: Tensor) -> Tensor:
            if records(x, codebooks, scales, bias):  # fine-tuning, as for a Linear
                return trainable_tied_head(x, codebook_values(codebooks, scales), codes, bits, vocab, bias)
            return torch_forms.tied_head_torch(x, codebook_values(codebooks, scales, x.dtype), unpack_codes(codes, bits, vocab),
                                               bias)

        return torch_form
    dim = x.shape[-1]
    tokens = x.numel() // dim
    pdl = programmatic(kernels, x.device)
    if tokens <= HEAD_SCORE_TOKENS:
        return lambda x: kernels.scored_head(x, codes, codebooks, scales, bits, vocab, bias, pdl=pdl)
    if tokens <= HEAD_FUSED_TOKENS:
        return lambda x: kernels.packed_head(x, codes, codebooks, scales, bits, vocab, bias)
    device, dtype, shape = x.device, x.dtype, (*x.shape[:-1], vocab)
    chunk = max(64, HEAD_CHUNK_BYTES // (dim * x.element_size()) // 64 * 64)  # whole byte tiles of codes per chunk
    chunks = [(first, min(chunk, vocab - first),
               kernels.decode_plan(codes, codebooks, scales, bits, vocab, dim, 1, min(chunk, vocab - first), first_column=first,
                                   pdl=pdl))
              for first in range(0, vocab, chunk)]

    def logits(x: Tensor) -> Tensor:
        rows = x.reshape(tokens, dim)
        out = torch.empty(tokens, vocab, device=device, dtype=dtype)
        for first, count, decode in chunks:
            table = torch.empty(count, dim, device=device, dtype=dtype)
            decode(table, None)
            torch.mm(rows, table.T, out=out[:, first:first + count])
        if bias is not None:
            out += bias
        return out.view(shape)

    return logits


def tied_head(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None, bias: Tensor | None, bits: int,
              vocab: int) -> Tensor:
    """Logits of rotated hidden states against a packed table of ``vocab`` rows."""
    return tied_head_plan(x, codes, codebooks, scales, bias, bits, vocab)(x)
