"""Fitting one weight (or several stacked ones that share their inputs) against its output error.

The steps, for a Linear (``ROWS``: pieces of D rows, a codebook per row group):
  1. initial codebooks by k-means of the pieces weighted by diag(H), the energy of their input;
  2. codes by the column sweep with GPTQ's error feedback (``sweep``);
  3. codebooks refitted by least squares with the codes fixed (``refit``);
  4. 2 and 3 again while the output error falls by more than ``tol``; the best pair is kept.
Codebooks are rounded to their storage precision (int8 + scale, or 16-bit) before every sweep,
so codes are always chosen against what will be stored.

For an embedding table (``COLS``: pieces of D columns, a codebook per column group, shared by
all rows) the same steps run with row weights (token frequencies) and, for a tied head, the
head's input statistics as H; an untied input embedding has H = I and the sweep is the nearest
code (k-means itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kmeans import kmeans, weighted_quantiles, weighted_sample
from ..kernels.layout import EMBEDDING, LINEAR, to_pieces
from .codebooks import CodebookSet
from .hessian import SweepFactor, prepare
from .refit import refit_cols, refit_rows
from .sweep import descending_order, sweep_cols, sweep_rows

INIT_ITERATIONS = 10  # Lloyd iterations of the initial k-means
INIT_TABLE_ROWS = 16384  # rows of an embedding table its initial k-means sees (a stratified sample above this)
KMEANS_PLUSPLUS_CODES = 64  # above this K, k-means++ (K sequential passes) costs more than it gives a start
ROWS = "rows"  # a Linear's layout: W (out, in), pieces along the output dimension
COLS = "cols"  # an embedding's layout: E (rows, dim), pieces along the embedding dimension


@dataclass
class FitProblem:
    """``weight`` (rows, in) float32 and what its error is measured with.

    ``hessian`` (in, in): mean x x^T of the inputs that multiply it (None: H = I, an input embedding);
    ``row_weights`` (rows,): how much each row counts (COLS only: token frequencies).
    """

    weight: Tensor
    orientation: str
    hessian: Tensor | None = None
    row_weights: Tensor | None = None
    _factor: SweepFactor | None = field(default=None, repr=False)

    @property
    def factor(self) -> SweepFactor | None:
        if self.hessian is None:
            return None
        if self._factor is None:
            self._factor = prepare(self.hessian)
        return self._factor

    def row_errors(self, decoded: Tensor) -> Tensor:
        """Output error of every row, (w - w_hat)^T H (w - w_hat) (times its row weight in COLS)."""
        delta = self.weight - decoded
        errors = (delta * delta).sum(1) if self.hessian is None else ((delta @ self.hessian) * delta).sum(1)
        return errors if self.row_weights is None else errors * self.row_weights

    def row_energy(self) -> Tensor:
        """What ``row_errors`` would be with W_hat = 0: the denominator of the relative output error."""
        return self.row_errors(torch.zeros_like(self.weight))


@dataclass
class FitResult:
    """Codes (M, columns) long, codebooks as stored (float32 values), per-row output errors, the error per round."""

    codes: Tensor
    codebooks: CodebookSet
    row_errors: Tensor
    history: list[float]


def initial_codebooks(
    problem: FitProblem, piece: int, size: int, int8: bool, float_dtype: torch.dtype, seed: int, iterations: int | None = None
) -> CodebookSet:
    """k-means codebooks for a (single-format) problem: pieces weighted by their input energy (``iterations`` of Lloyd)."""
    iterations = INIT_ITERATIONS if iterations is None else iterations
    weight = problem.weight
    if problem.orientation == ROWS:
        points = to_pieces(weight, weight.shape[0] // piece, LINEAR)
        energy = problem.hessian.diagonal() if problem.hessian is not None else torch.ones(weight.shape[1], device=weight.device)
        sample_weight = energy.clamp_min(1e-12 * float(energy.max().clamp_min(1e-30)))
        centroids = _kmeans(points.contiguous(), size, sample_weight, seed, iterations)
    else:
        num_books = weight.shape[1] // piece
        weight, row_weights = _init_sample(weight, problem.row_weights, seed)
        points = to_pieces(weight, num_books, EMBEDDING)  # (M, rows, D)
        scale = torch.ones(num_books, 1, piece, device=weight.device)
        if problem.hessian is not None:
            energy = problem.hessian.diagonal()
            scale = energy.clamp_min(1e-8 * float(energy.max().clamp_min(1e-30))).sqrt().reshape(num_books, 1, piece)
        centroids = _kmeans((points * scale).contiguous(), size, row_weights, seed, iterations) / scale
    num_books = centroids.shape[0]
    sizes = torch.full((num_books,), size, dtype=torch.long, device=weight.device)
    flags = torch.full((num_books,), int8, dtype=torch.bool, device=weight.device)
    return CodebookSet(centroids.float(), sizes, flags, float_dtype)


def _init_sample(weight: Tensor, row_weights: Tensor | None, seed: int) -> tuple[Tensor, Tensor | None]:
    """The rows of a large table its initial k-means clusters: the heaviest half of INIT_TABLE_ROWS, and a
    uniform sample of the rest with weights scaled to stand for all of it (an unbiased estimate of the
    weighted objective that keeps the frequent tokens). 49k rows x 288 codebooks x K=256 took 2 minutes
    on a CPU for a start that the sweep and refit then move anyway."""
    rows = weight.shape[0]
    if rows <= INIT_TABLE_ROWS:
        return weight, row_weights
    f = torch.ones(rows, device=weight.device) if row_weights is None else row_weights.float()
    heavy = torch.topk(f, INIT_TABLE_ROWS // 2).indices
    rest = torch.ones(rows, dtype=torch.bool, device=weight.device)
    rest[heavy] = False
    others = rest.nonzero().squeeze(1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = others[torch.randperm(others.numel(), generator=generator)[: INIT_TABLE_ROWS - heavy.numel()].to(weight.device)]
    picked = torch.cat([heavy, drawn])
    weights = f[picked].clone()
    weights[heavy.numel() :] *= others.numel() / max(1, drawn.numel())
    return weight[picked], weights


def _kmeans(points: Tensor, size: int, sample_weight: Tensor | None, seed: int, iterations: int) -> Tensor:
    """Initial centroids (M, K, D): a few Lloyd iterations, seeded by weighted quantiles for scalar pieces.

    Only a start: the sweep and refit that follow move the codebooks much further than more
    k-means iterations would.
    """
    init = None
    if points.shape[1] > size:
        if points.shape[2] == 1:
            init = weighted_quantiles(points, size, sample_weight)
        elif size > KMEANS_PLUSPLUS_CODES:
            init = weighted_sample(points, size, sample_weight, seed)
    return kmeans(points, size, sample_weight=sample_weight, max_iter=iterations, seed=seed, init=init).centroids


def decode_fit(problem: FitProblem, codes: Tensor, codebooks: CodebookSet) -> Tensor:
    """The weight that ``codes`` and ``codebooks`` stand for, in the problem's (rows, in) orientation."""
    values = codebooks.values
    num_books, size, piece = values.shape
    offsets = torch.arange(num_books, device=codes.device)[:, None] * size
    pieces = values.reshape(-1, piece)[codes + offsets]  # (M, columns, D)
    if problem.orientation == ROWS:
        return pieces.transpose(1, 2).reshape(num_books * piece, codes.shape[1])
    return pieces.transpose(0, 1).reshape(codes.shape[1], num_books * piece)


def fit(problem: FitProblem, codebooks: CodebookSet, *, rounds: int, tol: float = 1e-3, refit: bool = True) -> FitResult:
    """Alternate sweep and refit from ``codebooks`` for at most ``rounds`` rounds; the best (codes, codebooks) wins.

    ``refit`` False: sweeps only (one is all a measurement needs to rank formats).
    """
    factor = problem.factor
    order = None
    if factor is not None:
        order = descending_order(factor.hessian, 1 if problem.orientation == ROWS else codebooks.values.shape[2])
    current = codebooks.project()
    best: tuple[float, Tensor, CodebookSet, Tensor] | None = None
    history: list[float] = []
    for _ in range(max(1, rounds)):
        codes = _sweep(problem, factor, current, order)
        # the refit is the least-squares optimum for these codes, so only the rounding to storage can
        # make it worse than the codebooks the sweep used: scoring it alone is enough
        candidate = _refit(problem, codes, current).project() if refit else current
        errors = problem.row_errors(decode_fit(problem, codes, candidate))
        total = float(errors.sum())
        if best is None or total < best[0]:
            best = (total, codes, candidate, errors)
        history.append(best[0])
        current = candidate
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
    _, codes, chosen, errors = best
    return FitResult(codes, chosen, errors, history)


def _sweep(problem: FitProblem, factor: SweepFactor | None, codebooks: CodebookSet, order: Tensor | None) -> Tensor:
    if problem.orientation == ROWS:
        if factor is None:  # no statistics: nearest code per piece
            points = to_pieces(problem.weight, codebooks.values.shape[0], LINEAR).contiguous()
            from .sweep import nearest_codes

            return nearest_codes(points, codebooks.values, codebooks.padding())
        return sweep_rows(problem.weight, factor, codebooks, order)
    return sweep_cols(problem.weight, factor, codebooks, order)


def _refit(problem: FitProblem, codes: Tensor, codebooks: CodebookSet) -> CodebookSet:
    if problem.orientation == ROWS:
        hessian = problem.hessian if problem.hessian is not None else torch.eye(problem.weight.shape[1], device=codes.device)
        return refit_rows(problem.weight, hessian, codes, codebooks)
    return refit_cols(problem.weight, problem.hessian, codes, codebooks, problem.row_weights)
