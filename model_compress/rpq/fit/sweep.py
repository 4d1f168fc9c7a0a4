"""Codes assigned one input column at a time with GPTQ's error feedback (Frantar et al., 2022).

Visiting the input columns in order, each column's pieces take their nearest codes, and the
error left is spread over the columns not yet visited through the Cholesky factor U of H^-1, so
that later columns compensate for it: the output error tr((W - W_hat) H (W - W_hat)^T) falls
well below what nearest-code assignment alone leaves. Columns are visited in descending order of
diag(H) (the inputs that carry the most energy first, GPTQ's act-order); the order changes only
the fit, not the stored layout. Updates inside a block of columns are immediate, those to the
columns after it are applied once per block as one matrix product (GPTQ's lazy batch update).

Two orientations, matching the two RPQ layouts:
  ``sweep_rows``  a Linear: pieces are D consecutive rows of one input column, each row group has
                  its own codebook; one column is one step.
  ``sweep_cols``  an embedding table used as a head: pieces are D consecutive input columns of one
                  row, each column group has one codebook shared by all rows; one group is one
                  step, and its D columns are matched jointly under the metric of U's D x D block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .codebooks import CodebookSet
from .hessian import SweepFactor

BLOCK_COLUMNS = 128  # GPTQ's block size for the lazy updates


def descending_order(hessian: Tensor, group: int = 1) -> Tensor:
    """Column groups of size ``group`` by descending summed diag(H), as a permutation of the columns."""
    energy = hessian.diagonal().reshape(-1, group).sum(1)
    groups = torch.argsort(energy, descending=True, stable=True)
    return (groups[:, None] * group + torch.arange(group, device=hessian.device)).reshape(-1)


SCORE_BYTES = 256 * 1024 * 1024  # bound on nearest_codes' (M, n, K) scores: a big table's would take tens of GB at once


def nearest_codes(points: Tensor, codebooks: Tensor, padding: Tensor) -> Tensor:
    """Nearest code per codebook: ``points`` (M, n, D), ``codebooks`` (M, K, D), ``padding`` (M, K) -> (M, n).

    Points are scored a slice of n at a time, so the scores stay under SCORE_BYTES (Qwen2.5's 151,936 x 896
    table in pairs at K=64 would otherwise hold 17 GB of them).
    """
    num_books, count, _ = points.shape
    norms = (codebooks.pow(2).sum(-1) + padding)[:, None, :]
    step = max(1, SCORE_BYTES // (4 * num_books * codebooks.shape[1]))
    codes = torch.empty(num_books, count, dtype=torch.long, device=points.device)
    for start in range(0, count, step):
        part = points[:, start : start + step]
        codes[:, start : start + step] = torch.baddbmm(norms, part, codebooks.transpose(1, 2), alpha=-2.0).argmin(-1)
    return codes


def sweep_rows(weight: Tensor, factor: SweepFactor, codebooks: CodebookSet, order: Tensor | None = None) -> Tensor:
    """Codes (M, in) for ``weight`` (out, in) with codebooks (M, K, D), M * D = out, visiting columns in ``order``."""
    out_features, in_features = weight.shape
    values, padding = codebooks.values, codebooks.padding()
    num_books, size, piece = values.shape
    order = order if order is not None else descending_order(factor.hessian)
    upper = factor.inverse_factor[order][:, order]
    inverse_diagonal = 1.0 / upper.diagonal()
    work = weight.float()[:, order].T.contiguous()  # (in, out): each column a contiguous row
    codes = torch.empty(num_books, in_features, dtype=torch.long, device=weight.device)
    flat = values.reshape(num_books * size, piece)
    offsets = torch.arange(num_books, device=weight.device) * size
    if piece == 1:  # scalar codes: a binary search between each codebook's sorted midpoints
        ordered, ranks = (values[:, :, 0] + padding).sort(dim=1)
        midpoints = ((ordered[:, 1:] + ordered[:, :-1]) / 2).contiguous()
    for start in range(0, in_features, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, in_features)
        block = work[start:stop].clone()
        errors = torch.empty_like(block)
        block_upper = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = block[i]
            if piece == 1:
                chosen = ranks.gather(1, torch.searchsorted(midpoints, column[:, None]))[:, 0]
            else:  # nearest code per piece, elementwise (M x K x D): cheaper than M tiny products
                chosen = (values - column.view(num_books, 1, piece)).square_().sum(-1).add_(padding).argmin(1)
            codes[:, start + i] = chosen
            error = (column - flat[chosen + offsets].view(out_features)).mul_(inverse_diagonal[start + i])
            block[i:].addr_(block_upper[i, i:], error, alpha=-1.0)
            errors[i] = error
        work[stop:].addmm_(upper[start:stop, stop:].T, errors, alpha=-1.0)
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored


def sweep_cols(weight: Tensor, factor: SweepFactor | None, codebooks: CodebookSet, order: Tensor | None = None) -> Tensor:
    """Codes (M, rows) for ``weight`` (rows, in) with one codebook (K, D) per group of D input columns.

    ``factor`` None means H = I (an input embedding: rows are looked up, not multiplied), where
    the sweep is plain nearest-code assignment. ``order`` permutes whole groups (see descending_order).
    """
    rows, in_features = weight.shape
    values, padding = codebooks.values, codebooks.padding()
    num_books, _, piece = values.shape
    if factor is None:
        points = weight.float().reshape(rows, num_books, piece).transpose(0, 1)
        return nearest_codes(points.contiguous(), values, padding)
    order = order if order is not None else descending_order(factor.hessian, piece)
    upper = factor.inverse_factor[order][:, order]
    work = weight.float()[:, order].clone()
    codes = torch.empty(num_books, rows, dtype=torch.long, device=weight.device)
    step = max(piece, BLOCK_COLUMNS // piece * piece)
    for start in range(0, in_features, step):
        stop = min(start + step, in_features)
        block = work[:, start:stop].clone()
        errors = torch.empty_like(block)
        block_upper = upper[start:stop, start:stop]
        for i in range(0, stop - start, piece):
            group = slice(i, i + piece)
            book = int(order[start + i]) // piece
            inverse = torch.linalg.inv(block_upper[group, group])  # maps a residual row to its feedback error
            chosen = nearest_codes((block[:, group] @ inverse)[None], (values[book] @ inverse)[None], padding[book][None])[0]
            codes[book] = chosen
            error = (block[:, group] - values[book, chosen]) @ inverse
            block[:, i:] -= error @ block_upper[group, i:]
            errors[:, group] = error
        work[:, stop:].addmm_(errors, upper[start:stop, stop:], alpha=-1.0)
    return codes
