"""Triton kernels for the RPQ forward on CUDA: the weight is decoded tile by tile in registers, never whole.

Linear (``W[h*D + d, c] = codebooks[h, indices[h, c], d]``). One token (decoding): the binned kernel,
from the codes grouped by value (``layout.code_bins``): x summed over each group, times the group's
codebook row. A few tokens: the gather kernel, where a program owns a (tokens x outputs) tile of
``y``; for each slice of inputs it reads the slice's codes, gathers the matching codebook rows (a
few KB per codebook, so they come from L1/L2, not memory), and multiplies them with ``x``: with
tensor cores (``tl.dot``) from 16 tokens on, as a broadcast multiply-sum below. Memory traffic is
the codes plus each codebook once, about an eighth of the dense weight at the default M=32, K=256.
``linear_decode`` is the other large-batch path: decode ``W^T`` into a temporary with one kernel,
then cuBLAS.

Embedding: one gather kernel for the rows asked for. Tied LM head: ``x_h @ codebooks[h]^T`` scores
the K codes of every codebook (a small kernel), then a kernel sums, for each vocabulary row, the
scores of its M codes: the table is never decoded.

Everything here is launch-only: no host syncs, no host-visible allocation besides the outputs (and
the split-K arrival counters, kept per device), so a model using these kernels can be
captured in a CUDA graph. Temporaries (split-K partials, the decode paths' W^T or table chunk)
come from PyTorch's caching allocator and go back to it after the call: a buffer kept for the
largest call would sit in every later decode step's memory. Which path and which tile sizes a call takes is decided in
``routes``.

One file per kernel family: ``gather``, ``binned``, ``decode``, ``tied_head``; what they share is in ``common``.
"""

from __future__ import annotations

from .binned import binned_fits, linear_binned, MAX_GROUP, linear_binned_group
from .common import clear_workspaces, kept_bytes, tile_counters, _cdiv, _next_power_of_2
from .decode import decode_rows, decode_weight_t, linear_decode, embedding
from .gather import linear_fused
from .tied_head import code_scores, tied_head_scores, tied_head_decode

__all__ = ["MAX_GROUP", "binned_fits", "clear_workspaces", "code_scores", "decode_rows", "decode_weight_t", "embedding", "kept_bytes", "linear_binned", "linear_binned_group", "linear_decode", "linear_fused", "tied_head_decode", "tied_head_scores", "tile_counters"]
