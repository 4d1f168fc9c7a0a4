"""The index: each head row cut into S pieces, each piece replaced by the nearest of K centroids of its subspace.

Scoring a hidden state x against every row is then asymmetric distance computation: x's pieces against the centroids,
and for each row a sum over its S codes (on CUDA one kernel, ``kernels/packed/head.py``, decodes each row's pieces in
registers). Each row r = w - w_hat also keeps two bounds on its error, and |x . r| is at most the smaller of

* ``||x|| * row_error`` (Cauchy-Schwarz), and
* ``||L^-1 x|| * metric_error``, with ``metric_error = ||L^T r||`` and M = L L^T = H + ridge * mean(diag H) * I, H the
  second moment of the hidden states the head reads (Cauchy-Schwarz in M's inner product). The clustering makes r
  small along the directions where x is large, which the plain bound cannot see; the ridge is picked on the calibration
  hidden states (the smallest mean bound), and any ridge gives a true bound, so a hidden state unlike them only
  loosens it.

Both are exact bounds, not estimates: the certificate (``search.py``) rests on them. The centroids are stored in the
dtype the kernel reads (``value_dtype``) and the errors measured against those stored values.

Data-aware clustering: given H, each subspace is clustered after whitening by its block of H (pieces p become
H_s^(1/2) p), which minimises the expected squared score error E[(x_s . (w_s - c))^2] instead of the plain distance;
the centroids are mapped back, so the scores are still x's pieces against them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..fit.kmeans import kmeans
from ..kernels.packed_forward import packed_kernels

RIDGES = (0.03, 0.1, 0.3, 1.0, 3.0)  # of mean(diag H): the metric's candidates, tried on the calibration states
SAMPLE_STATES = 256  # calibration states the ridge is chosen on
RESIDUAL_CHUNK_BYTES = 1 << 30  # rows' residuals w - w_hat are formed this many float64 bytes at a time: a 500k x 4096
# head's whole residual in float64 would be 16 GB
METRIC_MARGIN = 1e-3  # relative: L and L^-1 are stored in float32, so the metric bound is widened by their rounding


@dataclass
class PQHeadIndex:
    """Centroids (S, K, d), codes (S, V) uint8 (K <= 256), row_error (V,) float32 (Euclidean), metric_error (V,) and
    metric_inverse (width, width) L^-1 (None without hidden states), the largest exact row norm (for the certificate's
    rounding slack); width = S * d."""

    centroids: Tensor
    codes: Tensor
    row_error: Tensor
    largest_row_norm: float = 0.0
    metric_error: Tensor | None = None
    metric_inverse: Tensor | None = None

    @functools.cached_property
    def largest_row_error(self) -> float:
        """The largest Euclidean row error, read once (the certificate's rounding slack needs it at every step, and a
        read is a host sync, which a CUDA graph cannot capture)."""
        return float(self.row_error.max())

    @property
    def subspaces(self) -> int:
        return self.centroids.shape[0]

    @property
    def vocab(self) -> int:
        return self.codes.shape[1]

    @property
    def width(self) -> int:
        return self.centroids.shape[0] * self.centroids.shape[2]

    def decoded_rows(self, rows: slice = slice(None)) -> Tensor:
        """w_hat (V, width) float32, or its ``rows``: every row's pieces replaced by their centroids."""
        books = self.centroids.float()
        codes = self.codes[:, rows].long()
        pieces = torch.gather(books, 1, codes[:, :, None].expand(-1, -1, books.shape[2]))
        return pieces.permute(1, 0, 2).reshape(codes.shape[1], self.width)

    def approximate_scores(self, x: Tensor) -> Tensor:
        """x . w_hat for every row, (B, V) float32: on CUDA one kernel that decodes each row's pieces in registers
        (``kernels/packed/head.py``, float32 sums of exact products: x is cast to the centroids' dtype, which must
        hold it exactly: the model's own), elsewhere one table per subspace and a gather-sum of the codes."""
        kernels = self._scoring_kernels(x)
        if kernels is not None:
            return kernels.packed_head(x.to(self.centroids.dtype), self.codes, self.centroids, None, 8, self.vocab, None,
                                       out_dtype=torch.float32)
        return self.reference_scores(x)

    def upper_bounds(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """(B, V) float32: every row's approximate score, plus ``bias``, plus its error bound: an upper bound on its exact
        logit, what the shortlist's top-k reads. On CUDA the bound is added in the scoring kernel's epilogue, so this
        is the one vocabulary-wide tensor written."""
        token_scale, metric_scale = self._bound_scales(x)
        kernels = self._scoring_kernels(x)
        if kernels is not None:
            metric_error = None if metric_scale is None else self.metric_error
            bounds = kernels.RowBounds(token_scale, self.row_error, metric_scale, metric_error)
            return kernels.packed_head(x.to(self.centroids.dtype), self.codes, self.centroids, None, 8, self.vocab, bias,
                                       out_dtype=torch.float32, bounds=bounds)
        scores = self.reference_scores(x)
        if bias is not None:
            scores = scores + bias.float()
        return scores + self._bounds(token_scale, metric_scale)

    def _scoring_kernels(self, x: Tensor):
        """The packed kernels where they score this index (CUDA, 16-bit centroids, byte codes), else None."""
        kernels = packed_kernels(x)
        if kernels is not None and self.centroids.dtype in (torch.float16, torch.bfloat16) and self.codes.dtype == torch.uint8:
            return kernels
        return None

    def reference_scores(self, x: Tensor) -> Tensor:
        """The torch form of ``approximate_scores``: tables of x's pieces against the centroids, gathered by code."""
        pieces = x.float().reshape(x.shape[0], self.subspaces, -1)
        tables = torch.einsum("bsd,skd->bsk", pieces, self.centroids.float())
        scores = torch.zeros(x.shape[0], self.vocab, device=x.device)
        codes = self.codes.long()
        for subspace in range(self.subspaces):
            scores += tables[:, subspace, codes[subspace]]
        return scores

    def error_bounds(self, x: Tensor) -> Tensor:
        """(B, V): an upper bound on |x . (w - w_hat)| for every row, the smaller of the two bounds."""
        return self._bounds(*self._bound_scales(x))

    def _bound_scales(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B,) each: ||x||, and ||L^-1 x|| widened by the metric's rounding (None without the metric)."""
        x = x.float()
        metric = None
        if self.metric_inverse is not None:
            metric = (x @ self.metric_inverse.T).norm(dim=1) * (1 + METRIC_MARGIN)
        return x.norm(dim=1), metric

    def _bounds(self, token_scale: Tensor, metric_scale: Tensor | None) -> Tensor:
        bounds = token_scale[:, None] * self.row_error[None]
        if metric_scale is not None:
            bounds = torch.minimum(bounds, metric_scale[:, None] * self.metric_error[None])
        return bounds

    def to(self, device: torch.device) -> PQHeadIndex:
        moved = [None if t is None else t.to(device) for t in (self.metric_error, self.metric_inverse)]
        return PQHeadIndex(self.centroids.to(device), self.codes.to(device), self.row_error.to(device),
                           self.largest_row_norm, *moved)


def build_index(weight: Tensor, subspaces: int, centroids: int = 256, hidden_moment: Tensor | None = None,
                seed: int = 0, max_iter: int = 25, hidden_states: Tensor | None = None,
                value_dtype: torch.dtype = torch.float32) -> PQHeadIndex:
    """Index the rows of ``weight`` (V, width): ``subspaces`` pieces per row (it must divide the width), ``centroids``
    per subspace. ``hidden_states`` (n, width): what the head reads on calibration text, for data-aware clustering and
    the metric bound (``hidden_moment``, their E[x x^T], may be given instead; the ridge is then 1). ``value_dtype``:
    the dtype the centroids are stored and scored in."""
    vocab, width = weight.shape
    if centroids > 256:
        raise ValueError(f"at most 256 centroids per subspace (one byte per code), not {centroids}")
    if width % subspaces:
        raise ValueError(f"{subspaces} subspaces do not divide the head's width {width}")
    if hidden_states is not None:
        states = hidden_states.detach().reshape(-1, width).float()
        hidden_moment = states.T @ states / states.shape[0]
    piece = width // subspaces
    rows = weight.detach().float()
    points = rows.reshape(vocab, subspaces, piece).permute(1, 0, 2).contiguous()  # (S, V, d)
    unwhiten = None
    if hidden_moment is not None:
        moment = hidden_moment.to(rows.device).double()
        blocks = torch.stack([moment[s * piece:(s + 1) * piece, s * piece:(s + 1) * piece] for s in range(subspaces)])
        values, vectors = torch.linalg.eigh(blocks)
        values = values.clamp_min(values.amax(-1, keepdim=True) * 1e-6)
        whiten = (vectors * values.sqrt()[:, None, :]) @ vectors.transpose(1, 2)  # H_s^(1/2)
        unwhiten = (vectors * values.rsqrt()[:, None, :]) @ vectors.transpose(1, 2)
        step = max(1, RESIDUAL_CHUNK_BYTES // (8 * vocab * piece))  # subspaces at a time, in float64
        for first in range(0, subspaces, step):  # (H^(1/2) symmetric: p H^(1/2) = (H^(1/2) p)^T)
            part = slice(first, first + step)
            points[part] = torch.bmm(points[part].double(), whiten[part]).float()
    fitted = kmeans(points, min(centroids, vocab), seed=seed, max_iter=max_iter)
    books = fitted.centroids
    if unwhiten is not None:
        books = torch.bmm(books.double(), unwhiten).float()
    index = PQHeadIndex(books.to(value_dtype).contiguous(), fitted.codes.to(torch.uint8), torch.zeros(vocab), float(rows.norm(dim=1).max()))
    chunks = _row_chunks(vocab, width)
    residuals = lambda: ((rows[chunk] - index.decoded_rows(chunk).to(rows.device)) for chunk in chunks)  # noqa: E731
    index.row_error = torch.cat([residual.norm(dim=1) for residual in residuals()])
    if hidden_moment is not None:
        sample = None
        if hidden_states is not None:  # a few hundred states spread over the text: the ridge's choice needs no more
            sample = states[torch.linspace(0, states.shape[0] - 1, min(SAMPLE_STATES, states.shape[0])).long()]
        index.metric_inverse, index.metric_error = _metric_bound(hidden_moment.to(rows.device).double(), residuals,
                                                                 index.row_error, sample)
    return index


def _row_chunks(vocab: int, width: int) -> list[slice]:
    """Slices of rows whose float64 residuals take about ``RESIDUAL_CHUNK_BYTES``."""
    step = max(1, RESIDUAL_CHUNK_BYTES // (8 * width))
    return [slice(start, min(start + step, vocab)) for start in range(0, vocab, step)]


def _metric_bound(moment: Tensor, residuals: Callable[[], Iterator[Tensor]], row_error: Tensor,
                  sample: Tensor | None) -> tuple[Tensor, Tensor]:
    """L^-1 (float32) and ||L^T r|| per row for M = H + ridge * mean(diag H) * I; the ridge of ``RIDGES`` whose bound,
    the smaller of it and the plain one, is least on average over ``sample`` (without a sample: ridge 1).
    ``residuals()``: the rows' residuals r, chunk by chunk in row order."""
    scale = float(moment.diagonal().mean())
    best = None
    for ridge in RIDGES if sample is not None else (1.0,):
        factor = torch.linalg.cholesky(moment + ridge * scale * torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device))
        inverse = torch.linalg.solve_triangular(factor, torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device), upper=False)
        errors = torch.cat([(residual.double() @ factor).norm(dim=1).float() for residual in residuals()])
        if sample is None:
            return inverse.float(), errors
        plain = sample.norm(dim=1, keepdim=True) * row_error[None]
        metric = (sample.double() @ inverse.T).norm(dim=1, keepdim=True).float() * errors[None]
        mean_bound = float(torch.minimum(plain, metric).mean())
        if best is None or mean_bound < best[0]:
            best = (mean_bound, inverse.float(), errors)
    return best[1], best[2]
