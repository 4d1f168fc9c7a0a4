"""The index: each head row cut into S subspaces, each piece replaced by the nearest of K centroids of its subspace.

Scoring a hidden state x against every row is then asymmetric distance computation: one (S, K) table of x's pieces
against the centroids, and for each row a gather-sum of its S codes. Each row also keeps ``row_error`` = ||w - w_hat||,
so that |x . w - x . w_hat| <= ||x|| * row_error (Cauchy-Schwarz): the bound the certificate rests on.

Data-aware: given the second moment H of the hidden states the head reads, each subspace is clustered after whitening
by its block of H (pieces p become H_s^(1/2) p), which minimises the expected squared score error E[(x_s . (w_s -
c))^2] instead of the plain distance; the centroids are mapped back, so the table is still x's pieces against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..fit.kmeans import kmeans


@dataclass
class PQHeadIndex:
    """Centroids (S, K, d) float32, codes (S, V) int64, row_error (V,) float32, the largest exact row norm (for the
    certificate's rounding slack); width = S * d."""

    centroids: Tensor
    codes: Tensor
    row_error: Tensor
    largest_row_norm: float = 0.0

    @property
    def subspaces(self) -> int:
        return self.centroids.shape[0]

    @property
    def vocab(self) -> int:
        return self.codes.shape[1]

    @property
    def width(self) -> int:
        return self.centroids.shape[0] * self.centroids.shape[2]

    def decoded_rows(self) -> Tensor:
        """w_hat (V, width) float32: every row's pieces replaced by their centroids."""
        pieces = torch.gather(self.centroids, 1, self.codes[:, :, None].expand(-1, -1, self.centroids.shape[2]))
        return pieces.permute(1, 0, 2).reshape(self.vocab, self.width)

    def approximate_scores(self, x: Tensor) -> Tensor:
        """x . w_hat for every row, (B, V) float32, from one table per subspace and a gather-sum of the codes."""
        pieces = x.float().reshape(x.shape[0], self.subspaces, -1)
        tables = torch.einsum("bsd,skd->bsk", pieces, self.centroids)
        scores = torch.zeros(x.shape[0], self.vocab, device=x.device)
        for subspace in range(self.subspaces):
            scores += tables[:, subspace, self.codes[subspace]]
        return scores

    def to(self, device: torch.device) -> PQHeadIndex:
        return PQHeadIndex(self.centroids.to(device), self.codes.to(device), self.row_error.to(device), self.largest_row_norm)


def build_index(weight: Tensor, subspaces: int, centroids: int = 256, hidden_moment: Tensor | None = None,
                seed: int = 0, max_iter: int = 25) -> PQHeadIndex:
    """Index the rows of ``weight`` (V, width): ``subspaces`` pieces per row (it must divide the width), ``centroids``
    per subspace; ``hidden_moment`` (width, width): E[x x^T] of the hidden states, for data-aware clustering."""
    vocab, width = weight.shape
    if width % subspaces:
        raise ValueError(f"{subspaces} subspaces do not divide the head's width {width}")
    piece = width // subspaces
    rows = weight.detach().float()
    points = rows.reshape(vocab, subspaces, piece).permute(1, 0, 2).contiguous()  # (S, V, d)
    whiten = unwhiten = None
    if hidden_moment is not None:
        blocks = torch.stack([hidden_moment[s * piece:(s + 1) * piece, s * piece:(s + 1) * piece] for s in range(subspaces)])
        values, vectors = torch.linalg.eigh(blocks.double())
        values = values.clamp_min(values.amax(-1, keepdim=True) * 1e-6)
        whiten = (vectors * values.sqrt()[:, None, :]) @ vectors.transpose(1, 2)  # H_s^(1/2)
        unwhiten = (vectors * values.rsqrt()[:, None, :]) @ vectors.transpose(1, 2)
        points = torch.bmm(points.double(), whiten).float()  # (H^(1/2) symmetric: p H^(1/2) = (H^(1/2) p)^T)
    fitted = kmeans(points, min(centroids, vocab), seed=seed, max_iter=max_iter)
    books = fitted.centroids
    if unwhiten is not None:
        books = torch.bmm(books.double(), unwhiten).float()
    index = PQHeadIndex(books.contiguous(), fitted.codes, torch.zeros(vocab), float(rows.norm(dim=1).max()))
    index.row_error = (rows - index.decoded_rows().to(rows.device)).norm(dim=1)
    return index
