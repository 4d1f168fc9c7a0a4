"""The certified forward of an LM head: full-width logits, exact on the certified shortlist and -inf elsewhere, so
greedy decoding picks the dense argmax and top-k / top-p sampling work within the shortlist. ``full_logits`` (and
training, or anything autograd records) runs the head's own forward, for perplexity and fine-tuning.

It is a plain callable set as the head module's ``forward`` (``attach.py``), not a module: the head keeps its
parameters, names and ties, and nothing of the index enters the model's state dict.

Widening a shortlist reads the certificate on the host. Where that cannot happen (a step captured in a CUDA graph,
a ``torch.compile`` trace), and whenever ``fixed_rows`` is set, the head answers from a shortlist of a fixed size
(``search.fixed_shortlists``) and counts on the device the positions it could not certify, whose token may then
differ from the dense argmax: ``fixed_counts`` reads them afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.modules import RPQEmbedding
from .index import PQHeadIndex
from .search import certified_shortlists, fixed_shortlists

FIXED_ROWS = 1024  # a fixed shortlist's rows: SmolLM2's real head needed at most 6,124, at the median 433


class CertifiedForward:
    """``head``'s forward through ``index``; counts the positions answered and those that needed the whole head."""

    def __init__(self, head: nn.Module, index: PQHeadIndex, first_rows: int = 64) -> None:
        self.head = head
        self.index = index
        self.first_rows = first_rows
        self.full_logits = False
        self.fixed_rows: int | None = None  # set: every call answers from a fixed shortlist of this many rows
        self.positions = 0
        self.fallbacks = 0
        self._placed: dict[torch.device, PQHeadIndex] = {}
        self._fixed_counts: dict[torch.device, Tensor] = {}  # per device: (positions, uncertified), int64

    def own_forward(self, hidden: Tensor) -> Tensor:
        return type(self.head).forward(self.head, hidden)

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.full_logits or self.head.training or torch.is_grad_enabled() and hidden.requires_grad:
            return self.own_forward(hidden)
        rows = hidden.reshape(-1, hidden.shape[-1])
        bias = getattr(self.head, "bias", None)
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.fixed_rows is not None or capturing or torch.compiler.is_compiling():
            return self._fixed(rows, bias).reshape(*hidden.shape[:-1], self.index.vocab)
        lists = certified_shortlists(rows, self.placed(rows.device), self.exact_logits, bias, self.first_rows,
                                     exact_batch=self.exact_batch)
        logits = torch.full((rows.shape[0], self.index.vocab), float("-inf"), device=hidden.device, dtype=hidden.dtype)
        for position, shortlist in enumerate(lists):
            logits[position, shortlist.rows] = shortlist.logits.to(logits.dtype)
        self.positions += len(lists)
        self.fallbacks += sum(shortlist.fallback for shortlist in lists)
        return logits.reshape(*hidden.shape[:-1], self.index.vocab)

    def _fixed(self, rows: Tensor, bias: Tensor | None) -> Tensor:
        """Full-width logits from a fixed shortlist per position, the certificate counted on the device."""
        ids, exact, certified = fixed_shortlists(rows, self.placed(rows.device), self.exact_batch,
                                                 self.fixed_rows or FIXED_ROWS, bias)
        counts = self._fixed_counts.get(rows.device)
        if counts is None:  # a normal tensor even under inference_mode: fixed_counts() resets it outside it
            with torch.inference_mode(False):
                counts = self._fixed_counts[rows.device] = torch.zeros(2, dtype=torch.long, device=rows.device)
        counts[0] += rows.shape[0]
        counts[1] += (~certified).sum()
        logits = torch.full((rows.shape[0], self.index.vocab), float("-inf"), device=rows.device, dtype=rows.dtype)
        return logits.scatter_(1, ids, exact.to(logits.dtype))

    def fixed_counts(self) -> tuple[int, int]:
        """(positions answered from fixed shortlists, those not certified) since the last call; reads and resets."""
        positions = uncertified = 0
        for counts in self._fixed_counts.values():
            positions, uncertified = positions + int(counts[0]), uncertified + int(counts[1])
            counts.zero_()
        return positions, uncertified

    def exact_logits(self, x: Tensor, ids: Tensor) -> Tensor:
        """The exact logits (float32, bias included) of rows ``ids`` for one hidden state."""
        rows = self.rows(ids).float()
        out = rows @ x.float()
        bias = getattr(self.head, "bias", None)
        return out if bias is None else out + bias[ids].float()

    def exact_batch(self, x: Tensor, ids: Tensor) -> Tensor:
        """``exact_logits`` for every hidden state of ``x`` (B, width) and its own rows ``ids`` (B, k) at once."""
        rows = self.rows(ids.reshape(-1)).reshape(*ids.shape, -1).float()
        out = torch.einsum("bkd,bd->bk", rows, x.float())
        bias = getattr(self.head, "bias", None)
        return out if bias is None else out + bias[ids].float()

    def rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the head as it computes them: a Linear's weight rows, a tied RPQ head's embedding rows
        (decoded only where asked), else the head's decoded weight, kept once."""
        weight = getattr(self.head, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            return weight[ids]
        embedding = getattr(self.head, "embedding", None)
        if isinstance(embedding, RPQEmbedding):  # the lookup itself, never a subclass's scaling (Gemma's embed_scale)
            return RPQEmbedding.forward(embedding, ids)
        decoded = self.__dict__.get("_decoded")
        if decoded is None or decoded.device != ids.device:
            decoded = self.__dict__["_decoded"] = self.head.dequantize().to(ids.device)
        return decoded[ids]

    def describe(self) -> dict:
        """The index's shape and size, for the report."""
        index = self.index
        stored = sum(t.numel() * t.element_size() for t in (index.centroids, index.codes, index.row_error,
                                                              index.metric_error, index.metric_inverse) if t is not None)
        piece = index.width // index.subspaces
        return {"rows": index.vocab, "subspaces": index.subspaces, "values_per_code": piece, "centroids": index.centroids.shape[1],
                "code_bits_per_weight": 8 / piece, "bytes": stored, "first_rows": self.first_rows}

    def placed(self, device: torch.device) -> PQHeadIndex:
        """The index on ``device`` (moved once per device)."""
        found = self._placed.get(device)
        if found is None:
            found = self._placed[device] = self.index.to(device)
        return found

