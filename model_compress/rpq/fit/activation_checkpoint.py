"""Activation checkpointing of a model's blocks while fine-tuning, where one window's activations would not fit.

A training step keeps every block's activations for the backward pass. For a 7B-class model and one 2,048-token
window that is about 20 GB, and it was more than the H100's 80 GB before the compressed layers' product stopped
keeping int64 codes and a 16-bit copy of each weight (``kernels/trainable_product.py``). With each block checkpointed
(``torch.utils.checkpoint``, non-reentrant) only the blocks' inputs are kept, and the backward pass recomputes one
block at a time: one more forward pass of each block per step, the same gradients. So ``auto`` switches it on only
where the estimate below does not fit ``FREE_FRACTION`` of the memory free when training starts (``--finetune-checkpointing``
on / off decide instead), and the fine-tuning report says which.

transformers' own ``gradient_checkpointing_enable`` acts only in training mode, and fine-tuning runs the model in
evaluation mode (no dropout: the student matches the teacher's deterministic outputs), so the blocks are wrapped
here, for every family that has a stack of blocks.

The estimate (bytes, one window of ``tokens``): per block ``tokens * hidden * 34`` (the activations a transformer
block keeps, after Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022) doubled
for float32 residuals (a Llama block with fp32 weights under bfloat16 autocast kept 56 bytes per token and hidden
unit on a CPU), plus ``5 * heads * tokens**2`` doubled where attention is computed eagerly (its score matrices; fused
attention keeps none), plus a 16-bit copy of each dense layer's weight (2 bytes a weight; compressed layers keep
only their packed codes); and the head's logits three times in float32 (logits, log-probabilities, their gradient).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate.utils import get_max_memory
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...core import gpu_memory
from ...core.errors import UserError
from .stack import BlockStack

FREE_FRACTION = 0.5  # of the memory free when training starts: the rest is left to the allocator's caching and the optimizer
MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CheckpointChoice:
    """Whether the blocks are checkpointed, from the estimated bytes of one step and the memory free then."""

    checkpointed: bool
    estimate_bytes: int
    free_bytes: int

    def to_json(self) -> dict:
        return {"checkpointed": self.checkpointed, "estimate_bytes": self.estimate_bytes, "free_bytes": self.free_bytes}


def step_activation_bytes(model: nn.Module, stack: BlockStack, tokens: int) -> int:
    """Estimated bytes one training step on one window of ``tokens`` keeps for its backward pass (module docstring)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first_int(text, ("hidden_size", "d_model", "n_embd", "dim")) or _widest_input(stack.blocks[0])
    heads = _first_int(text, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")) or 1
    vocab = _first_int(text, ("vocab_size",)) or 0
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    per_block = 2 * 34 * tokens * hidden + (2 * 5 * heads * tokens * tokens if eager else 0)
    weights = sum(_weight_bytes(module) for module in stack.blocks.modules())
    return len(stack.blocks) * per_block + weights + 3 * 4 * tokens * vocab


def free_bytes(device: torch.device) -> int:
    """Memory free for training on ``device``: the GPU's free memory plus what torch's allocator holds unused, within
    ``--max-gpu-memory``; or the host's available memory."""
    if device.type == "cuda":
        return gpu_memory.read(device).usable
    return int(get_max_memory()["cpu"])


def check_mode(mode: str) -> None:
    """One line for a mode that is not ``MODES``' (the command checks it before any work; ``choose`` again)."""
    if mode not in MODES:
        raise UserError(f"--finetune-checkpointing must be one of {', '.join(MODES)}, got {mode!r}")


def choose(model: nn.Module, stack: BlockStack | None, tokens: int, device: torch.device, mode: str = "auto",
           free: int | None = None) -> CheckpointChoice:
    """``auto``: checkpoint where the estimate exceeds ``FREE_FRACTION`` of the free memory (``free``: tests give it);
    ``on`` / ``off``: as the user asked (still with the figures, for the report)."""
    check_mode(mode)
    if stack is None:
        return CheckpointChoice(False, 0, 0)
    estimate = step_activation_bytes(model, stack, tokens)
    free = free_bytes(torch.device(device)) if free is None else free
    wanted = estimate > FREE_FRACTION * free if mode == "auto" else mode == "on"
    return CheckpointChoice(wanted, estimate, free)


@contextlib.contextmanager
def checkpointed_blocks(stack: BlockStack | None, enabled: bool = True) -> Iterator[None]:
    """Every block of ``stack`` recomputed in the backward pass instead of keeping its activations, for the duration
    (an instance attribute shadows each block's ``forward``; removed after)."""
    blocks = list(stack.blocks) if enabled and stack is not None else []
    shadowed = [block.__dict__.get("forward") for block in blocks]  # a hook's own wrapper (accelerate's), kept
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    try:
        yield
    finally:
        for block, earlier in zip(blocks, shadowed):
            if earlier is None:
                del block.forward
            else:
                block.forward = earlier


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # held-out checks: nothing to keep, nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _first_int(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _weight_bytes(module: nn.Module) -> int:
    """What a layer keeps of its weight for the backward pass per step: a dense linear layer its 16-bit copy under
    autocast (2 bytes a weight); a compressed one nothing beyond its packed codes, which it holds anyway."""
    rows, columns = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if not (isinstance(rows, int) and isinstance(columns, int)) or hasattr(module, "code_bits"):
        return 0
    return 2 * rows * columns


def _widest_input(block: nn.Module) -> int:
    """A block's width where its config does not name one: the widest input of its linear-like layers."""
    widths = [getattr(m, "in_features", 0) for m in block.modules()]
    return max([w for w in widths if isinstance(w, int)] or [1])
