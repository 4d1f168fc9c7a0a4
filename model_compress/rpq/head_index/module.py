"""An LM head that answers from its certified shortlist: full-width logits, exact on the shortlist and -inf elsewhere,
so greedy decoding picks the dense argmax and top-k / top-p sampling work within the shortlist. ``full_logits`` (and
training) computes the whole head, for perplexity and fine-tuning. Fallbacks are counted."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .index import PQHeadIndex
from .search import certified_shortlists


class CertifiedHead(nn.Module):
    """``head`` (a dense Linear; its weight is what the index approximates) with ``index`` in front of it."""

    def __init__(self, head: nn.Linear, index: PQHeadIndex, first_rows: int = 64) -> None:
        super().__init__()
        self.head = head
        self.index = index
        self.first_rows = first_rows
        self.full_logits = False
        self.positions = 0
        self.fallbacks = 0
        self.train(head.training)  # an eval-mode model's head answers from the index at once

    def forward(self, hidden: Tensor) -> Tensor:
        if self.full_logits or self.training or torch.is_grad_enabled() and hidden.requires_grad:
            return self.head(hidden)
        rows = hidden.reshape(-1, hidden.shape[-1])
        weight, bias = self.head.weight, self.head.bias

        def exact(x: Tensor, ids: Tensor) -> Tensor:
            out = weight[ids] @ x
            return out if bias is None else out + bias[ids]

        lists = certified_shortlists(rows, self.index, exact, bias, self.first_rows)
        logits = torch.full((rows.shape[0], self.index.vocab), float("-inf"), device=hidden.device, dtype=hidden.dtype)
        for position, shortlist in enumerate(lists):
            logits[position, shortlist.rows] = shortlist.logits.to(logits.dtype)
        self.positions += len(lists)
        self.fallbacks += sum(shortlist.fallback for shortlist in lists)
        return logits.reshape(*hidden.shape[:-1], self.index.vocab)
