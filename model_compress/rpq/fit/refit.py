"""Codebooks refitted in closed form with the codes fixed: the least-squares solution of the output error.

Linear (``refit_rows``): rows are independent under tr((W - W_hat) H (W - W_hat)^T), so codebook h
(rows hD .. hD+D-1, codes a_h) solves its own K x K system G c = r with G = S H S^T and r = S H w,
S the one-hot matrix of a_h: one batched solve for all codebooks. A small ridge towards the
current values keeps codes that no column uses where they are, and makes every solve definite:
the objective can only fall.

Embedding as a head (``refit_cols``): the codebooks of different column groups are coupled
through H, so they are refitted one group at a time with the others fixed (block coordinate
descent: each step is that group's exact minimiser, so the objective can only fall), with the
residual's product by H kept up to date. With H = I (an input embedding) this is the weighted
centroid step of k-means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .codebooks import CodebookSet

RIDGE = 1e-6  # relative to each codebook's mean diagonal of G (of H for tables)
REFIT_BLOCK_COLUMNS = 64  # refit_cols updates the residual's product by H for columns past a block once per block
CHUNK_BYTES = 256 * 1024 * 1024  # bound on the one-hot temporaries of refit_rows


def refit_rows(weight: Tensor, hessian: Tensor, codes: Tensor, codebooks: CodebookSet) -> CodebookSet:
    """Least-squares codebooks (M, K, D) for ``weight`` (out, in) given ``codes`` (M, in) and H (in, in).

    Codebooks of one stack may use different K (padding above): each size is solved at its own K.
    """
    num_books, _, piece = codebooks.values.shape
    in_features = weight.shape[1]
    # S H w for every row: H W^T once, then summed by code
    h_weight = (hessian @ weight.float().T).T.reshape(num_books, piece, in_features)
    fitted = codebooks.values.clone()
    for size in codebooks.sizes.unique().tolist():
        books = (codebooks.sizes == size).nonzero().squeeze(1)
        per_book = 8 * in_features * size if size <= ONE_HOT_CODES else 4 * size * size
        for chunk in books.split(max(1, CHUNK_BYTES // per_book)):
            chunk_codes = codes[chunk]
            gram = _gram(hessian, chunk_codes, size)
            target = torch.zeros(len(chunk), piece, size, device=weight.device)
            target.scatter_add_(2, chunk_codes[:, None, :].expand(-1, piece, -1), h_weight[chunk])
            ridge = RIDGE * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
            current = codebooks.values[chunk, :size]
            eye = torch.eye(size, device=weight.device)
            fitted[chunk, :size] = _solve(gram + ridge * eye, target.transpose(1, 2) + ridge * current)
    return codebooks.with_values(fitted)


ONE_HOT_CODES = 64  # up to this K the Gram matrices come from one GEMM with the one-hot codes; above, from sums by code


def _gram(hessian: Tensor, codes: Tensor, size: int) -> Tensor:
    """S H S^T (m, K, K) for codes (m, in): H summed over every pair of codes.

    Small K: one GEMM of H with the one-hot matrix (m * in * in * K multiply-adds, fast on any device).
    Large K: per row of codes, H's rows summed by code (S H, contiguous row adds: H is symmetric), then
    that product's columns summed by code: m * in * in additions whatever K is, and no (in, in) temporary
    per row (a 4864-wide down_proj at K=256: 0.12 s a row on two CPU cores, where permuted prefix sums
    took 1.5 s).
    """
    count, in_features = codes.shape
    if size <= ONE_HOT_CODES:
        one_hot = torch.zeros(in_features, count, size, device=codes.device)
        one_hot.scatter_(2, codes.T[:, :, None], 1.0)
        h_one_hot = (hessian @ one_hot.reshape(in_features, count * size)).reshape(in_features, count, size).transpose(0, 1)
        gram = torch.zeros(count, size, size, device=codes.device)
        return gram.scatter_add_(1, codes[:, :, None].expand(-1, -1, size), h_one_hot)
    hessian = hessian.float()
    gram = torch.empty(count, size, size, device=codes.device)
    for row, row_codes in enumerate(codes):
        summed_rows = torch.zeros(size, in_features, device=codes.device).index_add_(0, row_codes, hessian)
        gram[row] = torch.zeros(size, size, device=codes.device).index_add_(1, row_codes, summed_rows)
    return gram


def refit_cols(
    weight: Tensor, hessian: Tensor | None, codes: Tensor, codebooks: CodebookSet, row_weights: Tensor | None, sweeps: int = 2
) -> CodebookSet:
    """Codebooks (M, K, D), one per group of D columns of ``weight`` (rows, in), given ``codes`` (M, rows).

    Minimises sum_v f_v (w_v - w_hat_v)^T H (w_v - w_hat_v) over the codebooks, f = ``row_weights``.
    """
    rows, in_features = weight.shape
    num_books, size, piece = codebooks.values.shape
    values = codebooks.values.clone()
    f = torch.ones(rows, device=weight.device) if row_weights is None else row_weights.float()
    mass = torch.zeros(num_books, size, device=weight.device).scatter_add_(1, codes, f.expand(num_books, -1).contiguous())
    if hessian is None:  # uncoupled: every codebook's weighted centroids at once
        points = weight.float().reshape(rows, num_books, piece).transpose(0, 1) * f[None, :, None]
        sums = torch.zeros_like(values).scatter_add_(1, codes[:, :, None].expand(-1, -1, piece), points)
        centroids = sums / mass.clamp_min(1e-30)[:, :, None]
        return codebooks.with_values(torch.where((mass > 0)[:, :, None], centroids, values))
    residual = weight.float() - _decode_cols(values, codes)
    product = residual @ hessian  # kept equal to residual @ H: a group's step needs its columns of it
    ridge = RIDGE * hessian.diagonal().mean().clamp_min(1e-30) * torch.eye(piece, device=weight.device)
    step_columns = max(piece, REFIT_BLOCK_COLUMNS // piece * piece)
    for _ in range(sweeps):
        for first in range(0, in_features, step_columns):  # GPTQ's lazy update: columns past the block once per block
            last = min(first + step_columns, in_features)
            moved_block = torch.zeros(rows, last - first, device=weight.device)
            for book in range(first // piece, last // piece):
                group = slice(book * piece, (book + 1) * piece)
                sums = torch.zeros(size, piece, device=weight.device).index_add_(0, codes[book], product[:, group] * f[:, None])
                mean = sums / mass[book].clamp_min(1e-30)[:, None]
                step = torch.linalg.solve(hessian[group, group] + ridge, mean.T).T * (mass[book] > 0)[:, None]
                values[book] += step
                moved = step[codes[book]]  # (rows, D)
                residual[:, group] -= moved
                product[:, first:last] -= moved @ hessian[group, first:last]
                moved_block[:, group.start - first : group.stop - first] = moved
            product[:, :first] -= moved_block @ hessian[first:last, :first]
            product[:, last:] -= moved_block @ hessian[first:last, last:]
    return codebooks.with_values(values)


def _decode_cols(values: Tensor, codes: Tensor) -> Tensor:
    """(M, K, D) values and (M, rows) codes -> (rows, M * D)."""
    num_books, size, piece = values.shape
    offsets = torch.arange(num_books, device=codes.device)[:, None] * size
    return values.reshape(-1, piece)[codes + offsets].transpose(0, 1).reshape(codes.shape[1], num_books * piece)


def _solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Batched symmetric positive definite solve, with a least-squares fallback for any that fail."""
    lower, info = torch.linalg.cholesky_ex(matrix)
    solution = torch.cholesky_solve(rhs, lower)
    failed = info != 0
    if bool(failed.any()):
        solution[failed] = torch.linalg.lstsq(matrix[failed], rhs[failed]).solution
    return solution
