"""The grouped forward's schedule on the GPU: each row's leaf, the rows per leaf and the rows sorted by leaf.

Done in torch (the router's sign-path matmul and argmax, a stable argsort, a bincount, the cumulative sums of
the tile tables) it took about twenty small launches, most of the grouped path's fixed cost at a few hundred
tokens. Here it is a memset and two launches:

1. ``_count_kernel``: each row's leaf (walking the tree from the router logits, for one leaf per token; or
   given, for several), its rank among its leaf's rows (an atomic increment of the leaf's count) and so the
   counts. Ranks come in any order; that changes no result, because every row is computed on its own.
2. ``_place_kernel``: each row goes to its leaf's first sorted row (an exclusive sum of the counts, which
   every program recomputes: the leaves are few) plus its rank.

The grouped kernels then find a row tile's leaf from the counts alone (``triton_common.tile_rows``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import leaf_of

BLOCK = 1024  # rows per program: the work per row is a few loads


@triton.jit
def _count_kernel(logits_ptr, leaf_ptr, rank_ptr, counts_ptr, ROWS,
                  FROM_LOGITS: tl.constexpr, DEPTH: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < ROWS
    if FROM_LOGITS:
        leaf = leaf_of(logits_ptr, rows, ok, DEPTH)
        tl.store(leaf_ptr + rows, leaf, mask=ok)
    else:
        leaf = tl.load(leaf_ptr + rows, mask=ok, other=0).to(tl.int32)
    rank = tl.atomic_add(counts_ptr + leaf, 1, mask=ok)
    tl.store(rank_ptr + rows, rank, mask=ok)


@triton.jit
def _place_kernel(leaf_ptr, rank_ptr, counts_ptr, order_ptr, token_ptr, ROWS, NUM_LEAVES, PER_TOKEN,
                  WRITE_TOKENS: tl.constexpr, BLOCK: tl.constexpr, LEAVES_P2: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < ROWS
    leaf = tl.load(leaf_ptr + rows, mask=ok, other=0).to(tl.int32)
    rank = tl.load(rank_ptr + rows, mask=ok, other=0)
    leaves = tl.arange(0, LEAVES_P2)
    counts = tl.load(counts_ptr + leaves, mask=leaves < NUM_LEAVES, other=0)
    place = tl.gather(tl.cumsum(counts, 0) - counts, leaf, 0) + rank
    tl.store(order_ptr + place, rows, mask=ok)
    if WRITE_TOKENS:
        tl.store(token_ptr + place, rows // PER_TOKEN, mask=ok)


def _sort(logits: torch.Tensor | None, pair_leaf: torch.Tensor | None, rows: int, num_leaves: int, depth: int,
          per_token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = (logits if logits is not None else pair_leaf).device
    counts = torch.zeros(num_leaves, dtype=torch.int32, device=device)
    rank = torch.empty(rows, dtype=torch.int32, device=device)
    order = torch.empty(rows, dtype=torch.int32, device=device)
    from_logits = logits is not None
    if from_logits:
        pair_leaf = torch.empty(rows, dtype=torch.int32, device=device)
    grid = (max(1, triton.cdiv(rows, BLOCK)),)
    _count_kernel[grid](logits if from_logits else pair_leaf, pair_leaf, rank, counts, rows,
                        FROM_LOGITS=from_logits, DEPTH=depth, BLOCK=BLOCK, num_warps=4)
    token_of_row = torch.empty_like(order) if per_token > 1 else order
    _place_kernel[grid](pair_leaf, rank, counts, order, token_of_row, rows, num_leaves, per_token,
                        WRITE_TOKENS=per_token > 1, BLOCK=BLOCK, LEAVES_P2=triton.next_power_of_2(num_leaves),
                        num_warps=4)
    return order, token_of_row, counts


def sort_by_route(logits: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One leaf per token, from the (tokens, nodes) router logits: (order, token of each sorted row, counts).

    ``order`` maps a sorted row to its token; the rows of leaf 0 come first, then leaf 1's, and so on."""
    return _sort(logits.contiguous(), None, logits.shape[0], 2**depth, depth, 1)


def sort_by_leaf(pair_leaf: torch.Tensor, num_leaves: int, per_token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows given by their (tokens * per_token,) leaves: (order: sorted row -> pair, its token, counts)."""
    return _sort(None, pair_leaf.contiguous(), pair_leaf.numel(), num_leaves, 0, per_token)


def sort_rows(tree, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tree``'s rows for (tokens, hidden) ``x``, sorted: one leaf per token walked from the router logits, or
    each token's ``leaves_per_token`` top leaves (chosen in torch). Returns (order, token of each row, counts)."""
    if tree.leaves_per_token == 1:
        return sort_by_route(tree.router_logits(x), tree.depth)
    return sort_by_leaf(tree.routes(x).reshape(-1), tree.num_leaves, tree.leaves_per_token)
