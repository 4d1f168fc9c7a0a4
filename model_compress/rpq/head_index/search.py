"""Shortlist, exact re-rank, certificate.

For a hidden state x every row v has an upper bound on its exact logit: approx_v + b_v + ||x|| * row_error_v. Take the
k rows of highest bound, compute their exact logits, and call the best of them certified when it exceeds the (k+1)-th
highest bound (by a slack for float rounding): no row outside the shortlist can then score higher, so the best is the
dense argmax. Where it does not, the shortlist widens (k times ``WIDEN``) until it does; past ``max_rows`` the whole
head is computed (a fallback, counted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .index import PQHeadIndex

WIDEN = 4
SLACK = 1e-5  # of ||x|| * the largest row norm: float32 rounding in the table sums and the exact products


@dataclass
class Shortlist:
    """One position: the row ids, their exact logits, and whether the whole head had to be computed."""

    rows: Tensor
    logits: Tensor
    fallback: bool

    @property
    def best(self) -> int:
        return int(self.rows[self.logits.argmax()])


def certified_shortlists(x: Tensor, index: PQHeadIndex, exact_logits: Callable[[Tensor, Tensor], Tensor],
                         bias: Tensor | None = None, first_rows: int = 64, max_rows: int | None = None) -> list[Shortlist]:
    """A certified shortlist per row of ``x`` (B, width). ``exact_logits(x_row, ids)``: the exact logits of rows
    ``ids`` for one hidden state (bias included); ``bias``: the head's bias, for the bounds; ``max_rows``: the widest
    shortlist tried before the whole head (default: up to the whole head)."""
    approx = index.approximate_scores(x)
    if bias is not None:
        approx = approx + bias.float()
    norms = x.float().norm(dim=1)
    slack = SLACK * norms * index.largest_row_norm
    vocab = index.vocab
    limit = vocab if max_rows is None else min(max_rows, vocab)
    everything = torch.arange(vocab, device=x.device)
    lists = []
    for b in range(x.shape[0]):
        bounds = approx[b] + norms[b] * index.row_error
        rows = min(first_rows, limit)
        while True:
            if rows >= vocab:  # the whole head, exactly: nothing is left outside
                lists.append(Shortlist(everything, exact_logits(x[b], everything), True))
                break
            top = bounds.topk(rows + 1)
            ids = top.indices[:rows]
            logits = exact_logits(x[b], ids)
            if logits.max().float() > top.values[rows] + slack[b]:  # above every bound outside: certified
                lists.append(Shortlist(ids, logits, False))
                break
            if rows >= limit:  # the widest shortlist allowed is not certified: the whole head
                lists.append(Shortlist(everything, exact_logits(x[b], everything), True))
                break
            rows = min(rows * WIDEN, limit)
    return lists
