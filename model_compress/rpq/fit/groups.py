"""Fitting and measuring the layers of one shared input together, in the formats a plan gives them.

Layers that read the same input (q/k/v, gate/up) share H, so their weights are stacked row-wise
into one problem per piece length D (codebooks of different K are padded): one sweep serves them
all. Measurement fits each candidate (D, K) once with 16-bit codebooks (one round: k-means start,
sweep, refit) and also scores the same codes with the codebooks rounded to int8, which prices the
int8 form of that candidate without a second fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .defaults import DEFAULT_ROUNDS
from ..kernels.layout import INT8
from .codebooks import CodebookSet, stack
from .formats import CodeFormat
from .layer import COLS, ROWS, FitProblem, decode_fit, fit, initial_codebooks

# Measurement fits a sample of each layer's rows: a Linear's rows are independent under its output
# error, so the error of a few hundred rows (whole codebooks, spread over the layer) estimates the
# layer's at a fraction of the cost. An embedding table's rows share codebooks: a larger sample.
MEASURE_ROWS = 128
MEASURE_TABLE_ROWS = 4096


@dataclass
class FitSettings:
    """How hard to fit: sweep/refit rounds (stopping early when one gains less than ``tol``), the seed, the 16-bit float."""

    rounds: int = DEFAULT_ROUNDS["cuda"]
    tol: float = 5e-3
    seed: int = 0
    float_dtype: torch.dtype = torch.float16


@dataclass
class FittedLayer:
    """One layer's fit: codes (M, columns) int64 and codebooks (float32 values as stored), with its errors.

    ``weighted_error``: the relative output error with each output row weighed by its ``row_weights`` (the Fisher
    diagonal of the model's output in that channel, ``sensitivity``), where those were given.
    """

    codes: Tensor
    codebooks: CodebookSet
    weight_error: float
    output_error: float
    rounds: int
    weighted_error: float | None = None


def fit_rows_group(
    weights: list[Tensor],
    formats: list[CodeFormat],
    hessian: Tensor | None,
    settings: FitSettings,
    row_weights: list[Tensor | None] | None = None,
) -> list[FittedLayer]:
    """Fit Linear weights (out, in) that share ``hessian`` (None: plain k-means), each in its own format.

    ``row_weights`` (one per layer, (out,) or None) only weigh the ``weighted_error`` reported; the fit is the same.
    """
    row_weights = row_weights or [None] * len(weights)
    results: list[FittedLayer | None] = [None] * len(weights)
    for piece, members in _by_piece(weights, formats).items():
        problem, books, slices = _stacked(weights, formats, members, piece, hessian, settings)
        result = fit(problem, books, rounds=settings.rounds, tol=settings.tol)
        energy = problem.row_energy()
        decoded = decode_fit(problem, result.codes, result.codebooks)
        for member, rows in zip(members, slices):
            book_rows = slice(rows.start // piece, rows.stop // piece)
            results[member] = FittedLayer(
                result.codes[book_rows],
                result.codebooks.select(book_rows),
                _weight_error(problem.weight[rows], decoded[rows]),
                _relative(result.row_errors[rows], energy[rows]),
                len(result.history),
                None if row_weights[member] is None else _weighted(result.row_errors[rows], energy[rows], row_weights[member]),
            )
    return results


def measure_rows_group(
    weights: list[Tensor],
    candidates: list[list[CodeFormat]],
    hessian: Tensor | None,
    settings: FitSettings,
    row_weights: list[Tensor | None] | None = None,
) -> list[list[float]]:
    """Relative output error of every candidate format of every layer (same order as ``candidates``).

    Each (D, K) is fitted once, one round (k-means start, sweep, refit) with 16-bit codebooks, on a
    sample of the layer's rows (MEASURE_ROWS: on SmolLM2 within 4% of the whole layer's error); the
    same codes with the codebooks rounded to int8 price the int8 storage of that (D, K). With ``row_weights``
    (one per layer, (out,) or None) each row's error and energy are weighed by its weight (the Fisher diagonal
    of the model's output in that channel): the error a budget compares is then what the model feels.
    """
    row_weights = row_weights or [None] * len(weights)
    trials: list[tuple[int, CodeFormat]] = []  # (layer, 16-bit version of a candidate), each (D, K) once
    for layer, formats in enumerate(candidates):
        for fmt in sorted({_float_version(f, settings) for f in formats}, key=lambda f: (f.num_codebooks, f.codebook_size)):
            trials.append((layer, fmt))
    scores: dict[tuple[int, CodeFormat], float] = {}
    for piece, members in _by_piece([weights[layer] for layer, _ in trials], [fmt for _, fmt in trials]).items():
        chosen = [trials[m] for m in members]
        picks = [_sampled_rows(weights[layer].shape[0], piece, MEASURE_ROWS, settings.seed) for layer, _ in chosen]
        samples = [weights[layer] if rows is None else weights[layer][rows.to(weights[layer].device)] for (layer, _), rows in zip(chosen, picks)]
        sample_weights = [_picked(row_weights[layer], rows) for (layer, _), rows in zip(chosen, picks)]
        sampled_formats = [replace(f, num_codebooks=w.shape[0] // piece) for w, (_, f) in zip(samples, chosen)]
        problem, books, slices = _stacked(samples, sampled_formats, range(len(chosen)), piece, hessian, settings)
        result = fit(problem, books, rounds=1)
        energy = problem.row_energy()
        as_int8 = CodebookSet(result.codebooks.values, result.codebooks.sizes, torch.ones_like(result.codebooks.int8), settings.float_dtype)
        int8_errors = problem.row_errors(decode_fit(problem, result.codes, as_int8.project()))
        for (layer, fmt), rows, weighing in zip(chosen, slices, sample_weights):
            scores[(layer, fmt)] = _weighted(result.row_errors[rows], energy[rows], weighing)
            scores[(layer, _int8_version(fmt))] = _weighted(int8_errors[rows], energy[rows], weighing)
    return [[scores[(layer, _canonical(f, settings))] for f in formats] for layer, formats in enumerate(candidates)]


def fit_cols(
    weight: Tensor, fmt: CodeFormat, hessian: Tensor | None, row_weights: Tensor | None, settings: FitSettings, measuring: bool = False
) -> FittedLayer:
    """Fit an embedding table (rows, dim): row-weighted, under the head's H when it is also a tied head.

    ``measuring``: the one-round fit a measurement makes (see measure_rows_group).
    """
    problem = FitProblem(weight.float(), COLS, hessian, row_weights)
    piece = weight.shape[1] // fmt.num_codebooks
    books = initial_codebooks(problem, piece, fmt.codebook_size, fmt.codebook_dtype == INT8, settings.float_dtype, settings.seed)
    result = fit(problem, books, rounds=1 if measuring else settings.rounds, tol=settings.tol)
    decoded = decode_fit(problem, result.codes, result.codebooks)
    return FittedLayer(
        result.codes, result.codebooks, _weight_error(problem.weight, decoded),
        _relative(result.row_errors, problem.row_energy()), len(result.history),
    )


def measure_cols(
    weight: Tensor, candidates: list[CodeFormat], hessian: Tensor | None, row_weights: Tensor | None, settings: FitSettings
) -> list[float]:
    """Relative output error of every candidate format of an embedding table."""
    scores: dict[CodeFormat, float] = {}
    if weight.shape[0] > MEASURE_TABLE_ROWS:
        generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        picked = torch.randperm(weight.shape[0], generator=generator)[:MEASURE_TABLE_ROWS].to(weight.device)
        weight = weight[picked]
        row_weights = row_weights[picked] if row_weights is not None else None
    problem = FitProblem(weight.float(), COLS, hessian, row_weights)
    energy = float(problem.row_energy().sum())
    for fmt in {_float_version(f, settings) for f in candidates}:
        fitted = fit_cols(weight, fmt, hessian, row_weights, settings, measuring=True)
        scores[fmt] = fitted.output_error
        as_int8 = CodebookSet(fitted.codebooks.values, fitted.codebooks.sizes, torch.ones_like(fitted.codebooks.int8), settings.float_dtype)
        scores[_int8_version(fmt)] = float(problem.row_errors(decode_fit(problem, fitted.codes, as_int8.project())).sum()) / max(energy, 1e-30)
    return [scores[_canonical(f, settings)] for f in candidates]


def tied_metric(
    weight: Tensor, head_hessian: Tensor, row_weights: Tensor | None, head_weight: float = 1.0, input_weight: float = 1.0
) -> Tensor:
    """The metric a tied embedding / head is fitted under: both of its jobs, each as a relative error.

    As a head its error is sum_v f_v d_v^T H d_v over its energy c_H = sum_v f_v e_v^T H e_v; as an input
    embedding, sum_v f_v |d_v|^2 over c_I = sum_v f_v |e_v|^2. Weighted by what each costs the model
    (``head_weight``, ``input_weight``: see ``sensitivity``), their sum is d^T M d with
    M = head_weight / c_H * H + input_weight / c_I * I, returned scaled by c_I (a constant changes no fit).
    The relative error under M is then the weights' mean of the two relative errors.
    """
    weight = weight.float()
    f = torch.ones(weight.shape[0], device=weight.device) if row_weights is None else row_weights.float()
    head_energy = float((((weight @ head_hessian) * weight).sum(1) * f).sum())
    input_energy = float(((weight * weight).sum(1) * f).sum())
    scale = head_weight / max(input_weight, 1e-30) * input_energy / max(head_energy, 1e-30)
    return scale * head_hessian + torch.eye(weight.shape[1], device=weight.device)


def _stacked(
    weights: list[Tensor], formats: list[CodeFormat], members, piece: int, hessian: Tensor | None, settings: FitSettings
) -> tuple[FitProblem, CodebookSet, list[slice]]:
    """One ROWS problem of the members' weights stacked by rows, with their initial codebooks stacked alike."""
    books, slices, start = [], [], 0
    for member in members:
        weight, fmt = weights[member].float(), formats[member]
        problem = FitProblem(weight, ROWS, hessian)
        books.append(initial_codebooks(problem, piece, fmt.codebook_size, fmt.codebook_dtype == INT8, settings.float_dtype, settings.seed))
        slices.append(slice(start, start + weight.shape[0]))
        start += weight.shape[0]
    stacked_weight = torch.cat([weights[m].float() for m in members])
    return FitProblem(stacked_weight, ROWS, hessian), stack(books), slices


def _sampled_rows(rows: int, piece: int, most: int, seed: int) -> Tensor | None:
    """At most ``most`` of ``rows`` rows: whole groups of ``piece`` rows, drawn at random (seeded), in order; None: all."""
    groups = rows // piece
    keep = max(1, most // piece)
    if groups <= keep:
        return None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    picked = torch.randperm(groups, generator=generator)[:keep].sort().values
    return (picked[:, None] * piece + torch.arange(piece)).reshape(-1)


def _picked(values: Tensor | None, rows: Tensor | None) -> Tensor | None:
    if values is None or rows is None:
        return values
    return values[rows.to(values.device)]


def _by_piece(weights: list[Tensor], formats: list[CodeFormat]) -> dict[int, list[int]]:
    """Indices of the layers grouped by D (rows per piece): only one D can share a sweep."""
    groups: dict[int, list[int]] = {}
    for index, (weight, fmt) in enumerate(zip(weights, formats)):
        groups.setdefault(weight.shape[0] // fmt.num_codebooks, []).append(index)
    return groups


def _float_version(fmt: CodeFormat, settings: FitSettings) -> CodeFormat:
    return replace(fmt, codebook_dtype=_float_name(settings))


def _int8_version(fmt: CodeFormat) -> CodeFormat:
    return replace(fmt, codebook_dtype=INT8)


def _canonical(fmt: CodeFormat, settings: FitSettings) -> CodeFormat:
    return fmt if fmt.codebook_dtype == INT8 else _float_version(fmt, settings)


def _float_name(settings: FitSettings) -> str:
    return str(settings.float_dtype).removeprefix("torch.")


def _weight_error(weight: Tensor, decoded: Tensor) -> float:
    return float(torch.linalg.vector_norm(weight - decoded) / torch.linalg.vector_norm(weight).clamp_min(1e-30))


def _relative(errors: Tensor, energy: Tensor) -> float:
    return float(errors.sum()) / max(float(energy.sum()), 1e-30)


def _weighted(errors: Tensor, energy: Tensor, weights: Tensor | None) -> float | None:
    """The relative error with each row weighed by ``weights`` (the plain one where none are given)."""
    if weights is None:
        return _relative(errors, energy)
    weights = weights.to(errors.device, errors.dtype)
    return _relative(errors * weights, energy * weights)
