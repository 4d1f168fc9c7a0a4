"""Codebooks while they are being fitted: float32 values, each codebook's own size and storage precision.

Several layers (q/k/v) or several candidate settings of one layer can share one sweep when their
codebooks are stacked: a codebook smaller than the stack's largest K is padded with codes that the
nearest-code search can never pick, and each codebook remembers whether it is stored in 16 bits
or in 8 bits with one scale. ``project`` rounds the values to what will be stored, so the sweep
always assigns codes against the codebooks a user will load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INT8_LEVELS = 127  # symmetric int8 codebooks: values in [-127, 127] times one scale per codebook


@dataclass
class CodebookSet:
    """``values`` (M, K_max, D) float32; ``sizes`` (M,) codes in use per codebook; ``int8`` (M,) bool."""

    values: Tensor
    sizes: Tensor
    int8: Tensor
    float_dtype: torch.dtype = torch.float16

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape)

    def padding(self) -> Tensor:
        """(M, K_max) 0 for codes in use, +inf for padding: added to distances so padding is never nearest."""
        codes = torch.arange(self.values.shape[1], device=self.values.device)
        unused = codes[None, :] >= self.sizes[:, None]
        return torch.zeros(unused.shape, device=self.values.device).masked_fill_(unused, float("inf"))

    def project(self) -> "CodebookSet":
        """The values rounded to their storage: int8 times a per-codebook scale, or the 16-bit float dtype."""
        values = self.values
        scale = int8_scales(values)
        as_int8 = torch.round(values / scale[:, None, None]).clamp_(-INT8_LEVELS, INT8_LEVELS) * scale[:, None, None]
        as_float = values.to(self.float_dtype).float()
        projected = torch.where(self.int8[:, None, None], as_int8, as_float)
        unused = torch.arange(values.shape[1], device=values.device)[None, :] >= self.sizes[:, None]
        projected = projected.masked_fill(unused[:, :, None], 0.0)
        return CodebookSet(projected, self.sizes, self.int8, self.float_dtype)

    def int8_parts(self) -> tuple[Tensor, Tensor]:
        """Projected int8 values (M, K, D) and their float16 scales (M,): what an int8 codebook stores."""
        scale = int8_scales(self.values)
        levels = torch.round(self.values / scale[:, None, None]).clamp_(-INT8_LEVELS, INT8_LEVELS)
        return levels.to(torch.int8), scale.to(SCALE_DTYPE)

    def with_values(self, values: Tensor) -> "CodebookSet":
        return CodebookSet(values, self.sizes, self.int8, self.float_dtype)

    def select(self, books: slice) -> "CodebookSet":
        """Some codebooks of the set, trimmed to the largest K among them (stacks pad to the largest of all)."""
        size = int(self.sizes[books].max())
        return CodebookSet(self.values[books, :size], self.sizes[books], self.int8[books], self.float_dtype)


SCALE_DTYPE = torch.float16  # the stored scale of an int8 codebook
SMALLEST_SCALE = 2.0**-14  # float16's smallest normal number: scales stay out of the subnormal range


def int8_scales(values: Tensor) -> Tensor:
    """One scale per codebook (M,), as stored (float16, rounded up so the largest magnitude maps to <= 127)."""
    peak = values.abs().amax(dim=(1, 2)) / INT8_LEVELS
    stored = peak.clamp_min(SMALLEST_SCALE).to(SCALE_DTYPE)
    stored = torch.where(stored.float() < peak, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)
    return stored.float()


def stack(sets: list[CodebookSet]) -> CodebookSet:
    """One set from several (along M), padded to the largest K."""
    largest = max(s.values.shape[1] for s in sets)
    values = [torch.nn.functional.pad(s.values, (0, 0, 0, largest - s.values.shape[1])) for s in sets]
    return CodebookSet(
        torch.cat(values), torch.cat([s.sizes for s in sets]), torch.cat([s.int8 for s in sets]), sets[0].float_dtype
    )
