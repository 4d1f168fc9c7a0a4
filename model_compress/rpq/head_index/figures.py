"""What `compress eval` reports of a model whose head answers from a certified index, on the eval text's own hidden
states: how often the certified token is the dense argmax (by the certificate it must be, every time: this checks it),
how often the index's approximate scores alone rank it first or within the top 8 / 64, how often the whole head had
to be computed (fallbacks), the shortlists' sizes, and the time of one position's head against the dense head's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attach import attached, head_inputs
from .module import FIXED_ROWS
from .search import certified_shortlists

POSITIONS = 512  # hidden states measured: enough for a rate to a fraction of a percent, quick on a CPU
RECALL_AT = (1, 8, 64)
TIMED = 32  # positions timed one at a time, each head


def full_logits(model: nn.Module, on: bool) -> None:
    """An indexed head computes the whole head (``on``) or answers from its shortlists again."""
    certified = attached(model)
    if certified is not None:
        certified.full_logits = on


def fixed_shortlists(model: nn.Module, on: bool) -> dict | None:
    """An indexed head answers from fixed shortlists (``on``: capturable in a CUDA graph) or as before; switching back
    returns the positions answered meanwhile and how many were not certified. None without an index."""
    certified = attached(model)
    if certified is None:
        return None
    certified.fixed_rows = FIXED_ROWS if on else None
    positions, uncertified = certified.fixed_counts()  # on: a fresh count; off: this one's
    return {"positions": positions, "uncertified": uncertified}


def head_figures(model: nn.Module, windows: Tensor, device: torch.device) -> dict | None:
    """The figures above over the first ``POSITIONS`` positions of ``windows`` (n, seq) token ids; None without an
    index. The model is on ``device``."""
    certified = attached(model)
    if certified is None:
        return None
    hidden = head_inputs(model, windows, device, POSITIONS)
    index = certified.placed(hidden.device)
    bias = getattr(certified.head, "bias", None)
    with torch.no_grad():
        rows = certified.rows(torch.arange(index.vocab, device=hidden.device)).float()
        dense = hidden.float() @ rows.T + (0 if bias is None else bias.float())
        truth = dense.argmax(dim=1)
        del rows, dense
        approx = index.approximate_scores(hidden) + (0 if bias is None else bias.float())
        lists = certified_shortlists(hidden, index, certified.exact_logits, bias, certified.first_rows,
                                     exact_batch=certified.exact_batch, scores=approx)
    sizes = [len(shortlist.rows) for shortlist in lists]
    timed = hidden[:TIMED]
    dense_ms = _per_call_ms(lambda x: certified.own_forward(x), timed)
    index_ms = _per_call_ms(lambda x: certified(x), timed)
    return {
        "head_index_positions": len(lists),
        "head_index_agreement": sum(s.best == int(t) for s, t in zip(lists, truth)) / len(lists),
        **{f"head_index_recall_top{k}": float((approx.topk(k, dim=1).indices == truth[:, None]).any(dim=1).float().mean())
           for k in RECALL_AT},
        "head_index_fallback_rate": sum(s.fallback for s in lists) / len(lists),
        "head_index_shortlist_mean": sum(sizes) / len(sizes),
        "head_index_shortlist_max": max(sizes),
        "head_ms_dense": dense_ms,
        "head_ms_index": index_ms,
    }


def _per_call_ms(call: Callable[[Tensor], Tensor], positions: Tensor) -> float:
    """Median milliseconds of one position's call (synchronised on CUDA), after one warm-up each."""
    times = []
    cuda = positions.device.type == "cuda"
    with torch.no_grad():
        for x in positions:
            call(x[None])
            if cuda:
                torch.cuda.synchronize(positions.device)
            start = time.perf_counter()
            call(x[None])
            if cuda:
                torch.cuda.synchronize(positions.device)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
