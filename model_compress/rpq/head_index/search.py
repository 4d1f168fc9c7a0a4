"""Shortlist, exact re-rank, certificate.

For a hidden state x every row v has an upper bound on its exact logit: approx_v + b_v + its error bound (``index.py``:
the smaller of ||x|| ||w_v - w_hat_v|| and the metric bound). Take the
k rows of highest bound, compute their exact logits, and call the best of them certified when it exceeds the (k+1)-th
highest bound (by a slack for float rounding): no row outside the shortlist can then score higher, so the best is the
dense argmax. Where it does not, the shortlist widens to every row whose bound reaches the best exact logit found,
which certifies (the best can only rise); past ``max_rows`` the whole head is computed (a fallback, counted).

Widening reads the certificate on the host, which a CUDA graph cannot capture. ``fixed_shortlists`` is the first
round alone, with every shape fixed and no host sync: k rows per position and the certificate left on the device,
for the caller to count (a position it does not certify may then miss the dense argmax).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .index import PQHeadIndex

FLOAT32_UNIT = 2.0**-24  # float32's unit roundoff


@dataclass
class Shortlist:
    """One position: the row ids, their exact logits, and whether the whole head had to be computed."""

    rows: Tensor
    logits: Tensor
    fallback: bool

    @property
    def best(self) -> int:
        return int(self.rows[self.logits.argmax()])


def rounding_slack(norms: Tensor, index: PQHeadIndex) -> Tensor:
    """What float32 rounding can move a score by: a sum of n products is off by at most n * u * sum |terms| (u the unit
    roundoff), and sum |terms| <= ||x|| * (largest row norm + largest error), for the approximate sums and the exact
    logits alike; twice that, for the two."""
    terms = index.width + 16  # the products of one score, and a few more operations (bias, bound)
    largest = index.largest_row_norm + index.largest_row_error
    return 2 * terms * FLOAT32_UNIT * norms * largest


def fixed_shortlists(x: Tensor, index: PQHeadIndex, exact_batch: Callable[[Tensor, Tensor], Tensor], rows: int,
                     bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """For every row of ``x`` (B, width): the ``rows`` rows of highest bound (B, rows), their exact logits (B, rows)
    and whether the best of them is certified (B,) bool, all on the device, with no host sync."""
    slack = rounding_slack(x.float().norm(dim=1), index)
    return _first_round(x, index.upper_bounds(x, bias), slack, exact_batch, min(rows, index.vocab))


def _first_round(x: Tensor, upper: Tensor, slack: Tensor, exact_batch: Callable[[Tensor, Tensor], Tensor],
                 rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every position's ``rows`` rows of highest bound ``upper`` (B, V), their exact logits, and whether the best of
    them is above every bound outside by ``slack`` (B,): the certificate, left on the device."""
    vocab = upper.shape[1]
    top = upper.topk(min(rows + 1, vocab), dim=1)
    ids = top.indices[:, :rows]
    logits = exact_batch(x, ids)
    if rows >= vocab:  # every row computed exactly: nothing outside to beat the best
        return ids, logits, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return ids, logits, logits.float().max(dim=1).values > top.values[:, rows] + slack


def certified_shortlists(x: Tensor, index: PQHeadIndex, exact_logits: Callable[[Tensor, Tensor], Tensor],
                         bias: Tensor | None = None, first_rows: int = 64, max_rows: int | None = None,
                         exact_batch: Callable[[Tensor, Tensor], Tensor] | None = None,
                         scores: Tensor | None = None) -> list[Shortlist]:
    """A certified shortlist per row of ``x`` (B, width). ``exact_logits(x_row, ids)``: the exact logits of rows
    ``ids`` for one hidden state (bias included); ``exact_batch(x, ids)``, where given: the same for every row of
    ``x`` at once (ids (B, k)), so that the first shortlists of a batch take one product and one host sync in all;
    ``bias``: the head's bias, for the bounds; ``max_rows``: the widest shortlist tried before the whole head (default:
    up to the whole head); ``scores``: the approximate scores, bias included, where the caller has them already."""
    upper = index.upper_bounds(x, bias) if scores is None else scores + index.error_bounds(x)
    norms = x.float().norm(dim=1)
    slack = rounding_slack(norms, index)
    vocab = index.vocab
    limit = vocab if max_rows is None else min(max_rows, vocab)
    first = min(first_rows, limit)
    lists: list[Shortlist | None] = [None] * x.shape[0]
    if exact_batch is not None and first < vocab:  # every position's first shortlist at once
        ids, logits, certified = _first_round(x, upper, slack, exact_batch, first)
        for b, done in enumerate(certified.tolist()):
            if done:
                lists[b] = Shortlist(ids[b], logits[b], False)
    for b in range(x.shape[0]):
        if lists[b] is None:
            lists[b] = _widened(x[b], upper[b], float(slack[b]), exact_logits, first, limit, vocab)
    return lists


def _widened(x: Tensor, bounds: Tensor, slack: float, exact_logits: Callable[[Tensor, Tensor], Tensor], rows: int,
             limit: int, vocab: int) -> Shortlist:
    """One position's certified shortlist, from ``rows`` rows up: widened to every row whose bound reaches the best
    exact logit found (with them all in, the best can only rise, so that shortlist certifies: a second round at
    most), else past ``limit`` the whole head."""
    everything = torch.arange(vocab, device=x.device)
    while True:
        if rows >= vocab:  # the whole head, exactly: nothing is left outside
            return Shortlist(everything, exact_logits(x, everything), True)
        top = bounds.topk(rows + 1)
        ids = top.indices[:rows]
        logits = exact_logits(x, ids)
        best = logits.max().float()
        if best > top.values[rows] + slack:  # above every bound outside: certified
            return Shortlist(ids, logits, False)
        if rows >= limit:  # the widest shortlist allowed is not certified: the whole head
            return Shortlist(everything, exact_logits(x, everything), True)
        rows = min(max(int((bounds + slack >= best).sum()), rows + 1), limit)
