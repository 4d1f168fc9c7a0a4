"""GPU kernels for the FFF tree's hard forward; the eager torch forward in ``tree`` is their reference.

``fast_hard_forward`` picks, for CUDA half-precision inputs whose activation the kernels know:
- one leaf per token and at most ``triton_decode.MAX_TOKENS`` tokens: the decode kernels (each token
  walks the tree in registers, reads its leaf's contiguous slice; four launches);
- otherwise the grouped kernels: the router logits in one matmul, each token's leaves and a counting
  sort of the rows by leaf (``triton_schedule``: a memset and two launches), a grouped GEMM over leaves for in/gate with the activation (and
  SwiGLU's product) fused, and one for the output projection that adds the shared neurons' part (dense:
  cuBLAS) and stores back in token order.
Neither waits on the host, so both can be captured in a CUDA graph. Anything else returns None and the
eager path runs (the CPU, float32, an activation the kernels do not know, no Triton).
"""

from __future__ import annotations

import functools

import torch

from .activation import kernel_activation

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _triton_modules():
    try:
        from . import triton_decode, triton_grouped
    except ImportError:  # no Triton (CPU wheels): the eager path
        return None
    return triton_decode, triton_grouped


def fast_hard_forward(tree, flat: torch.Tensor) -> torch.Tensor | None:
    """The hard forward of ``tree`` on (tokens, hidden) ``flat`` by the kernels, or None where they do not apply."""
    if flat.device.type != "cuda" or flat.dtype not in KERNEL_DTYPES or tree.leaf_in.dtype != flat.dtype:
        return None
    act = kernel_activation(tree.activation)
    modules = _triton_modules() if act is not None else None
    if modules is None:
        return None
    decode, grouped = modules
    flat = flat.contiguous()
    if tree.leaves_per_token == 1 and flat.shape[0] <= decode.MAX_TOKENS:
        return decode.decode_forward(tree, flat, act)
    return grouped.grouped_forward(tree, flat, act)
