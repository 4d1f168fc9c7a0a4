"""Perplexity of causal LMs and masked-LM loss of encoders, the way the field reports them.

Causal (GPTQ / llama.cpp convention): the text, joined with "\\n\\n", is tokenized once and cut
into non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped);
every window is scored on its own, each token predicted from the ones before it in its window.
Perplexity = exp(mean token NLL over all predicted tokens), in float32 whatever the model's dtype.

Masked LM: windows of ``seq_len - 2`` tokens get the model's [CLS] / [SEP]; 15% of the tokens are
chosen with a fixed seed (80% [MASK], 10% random, 10% kept, as BERT was trained) once, and the
same masked batches are given to both models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError

MASK_PROBABILITY = 0.15
IGNORED = -100  # the label of positions that are not scored (transformers' convention)


@dataclass
class NllResult:
    """Summed token NLL and how many tokens it covers."""

    nll_sum: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of ids, with the tokenizer's usual special tokens (once)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def cut_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """(windows, seq_len) from the first ``max_tokens`` ids; a UserError when not even one window fits."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    usable = ids if max_tokens is None else ids[:max_tokens]
    count = usable.numel() // seq_len
    if count == 0:
        limit = f" (capped by --max-tokens {max_tokens})" if max_tokens is not None and max_tokens < ids.numel() else ""
        raise UserError(
            f"the text has {usable.numel()} tokens{limit}, fewer than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    return usable[: count * seq_len].view(count, seq_len)


def causal_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> NllResult:
    """Summed NLL of every token after the first in each window, predicted from its left context."""
    labels = torch.full_like(windows, IGNORED)
    labels[:, :-1] = windows[:, 1:]  # position t predicts token t + 1; the last position predicts nothing
    return _summed_nll(model, windows, labels, batch_size, on_batch, use_cache=False)


@dataclass
class MaskedBatches:
    """Inputs with masks applied and labels (IGNORED where not masked), made once for both models."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def masked_windows(tokenizer, ids: torch.Tensor, seq_len: int, max_tokens: int | None, seed: int) -> MaskedBatches:
    """Windows of ``seq_len - 2`` text tokens wrapped in [CLS] ... [SEP], 15% masked with ``seed``."""
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token_id is None:
        raise UserError("the tokenizer has no mask token: masked-LM loss cannot be measured")
    first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
    if first is None or last is None:
        raise UserError("the tokenizer has no [CLS] / [SEP] tokens to frame masked-LM windows with")
    body = ids[~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))]  # each window gets its own framing
    windows = cut_windows(body, seq_len - 2, max_tokens)
    wrapped = [[first, *row.tolist(), last] for row in windows]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MASK_PROBABILITY, seed=seed)
    batch = collator([{"input_ids": row} for row in wrapped])
    return MaskedBatches(batch["input_ids"], batch["labels"])


def masked_nll(
    model: nn.Module,
    batches: MaskedBatches,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> NllResult:
    """Summed NLL of the masked tokens' true ids."""
    return _summed_nll(model, batches.input_ids, batches.labels, batch_size, on_batch)


def _summed_nll(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
    **forward,
) -> NllResult:
    """NLL of ``labels`` (IGNORED where nothing is predicted) under the model's logits, batch by batch, in float32."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size].to(device)
            targets = labels[start : start + batch_size].to(device)
            logits = model(input_ids=batch, **forward).logits
            total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORED, reduction="sum").item()
            count += int((targets != IGNORED).sum())
            if on_batch is not None:
                on_batch(batch.shape[0])
    return NllResult(total, count)
