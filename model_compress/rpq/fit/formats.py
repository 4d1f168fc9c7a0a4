"""Storage formats of one RPQ layer (M, K, codebook dtype), what each costs, and the candidates a budget picks from.

Bits per weight of a layer count everything it stores: the codes (M rows of ceil(log2 K)-bit codes,
packed into whole bytes), the codebooks (M * K * D values) and, for int8 codebooks, one float16
scale per codebook. The scales are kept in the dtype the layer computes in (the model's), so they cost
two bytes each in a 16-bit model and four in a float32 one: ``scale_bytes`` charges what is stored. Codebooks cost K * (codebook bits) / columns per weight, so narrow layers
(few input columns) need small K or int8 codebooks, and wide ones can afford more codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels.config.packed_routes import byte_permute_format
from ..kernels.layout import INT8, code_bits, codebook_bits, column_count, packed_width, split_dim

SCALE_BYTES = 2  # a 16-bit scale per int8 codebook (a float32 model stores 4: CodeFormat.scale_bytes)
PIECES = (1, 2, 4)  # D (weights per code) that a budget chooses from
# K above this costs far more fitting time (k-means and the sweep scale with K) for gains only an
# embedding table's many rows can pay for; --codebook-size takes any K up to 65,536.
LARGEST_BUDGET_CODES = 256
# A budget offers K <= columns / 8 for scalar codes (int8 codebooks then cost at most one bit per
# weight) and K <= columns / 32 for vector codes (a quarter bit): at equal total bits, scalar codes
# with the bits a bigger vector codebook would take measure better (vector quantization gains a few
# percent of error at equal code bits, one more code bit gains about three quarters).
POINTS_PER_CODE = {1: 8, 2: 32, 4: 32}
MOST_FITS = 6  # (D, K) pairs measured per layer: those whose cost is closest to the budget


@dataclass(frozen=True)
class CodeFormat:
    """How one layer is stored: M codebooks of K codes, codebook values in ``codebook_dtype`` ("int8" or a float dtype).

    ``scale_bytes``: what one int8 codebook's scale takes in this layer's dtype (a cost, not saved with the format).
    """

    num_codebooks: int
    codebook_size: int
    codebook_dtype: str
    scale_bytes: int = SCALE_BYTES

    def piece(self, shape: tuple[int, int], layout: str) -> int:
        """D, the weights per code."""
        return split_dim(shape, layout) // self.num_codebooks

    def code_bytes(self, shape: tuple[int, int], layout: str) -> int:
        return self.num_codebooks * packed_width(column_count(shape, layout), code_bits(self.codebook_size))

    def codebook_bytes(self, shape: tuple[int, int], layout: str) -> int:
        values = self.num_codebooks * self.codebook_size * self.piece(shape, layout)
        scales = self.num_codebooks * self.scale_bytes if self.codebook_dtype == INT8 else 0
        return values * codebook_bits(self.codebook_dtype) // 8 + scales

    def stored_bytes(self, shape: tuple[int, int], layout: str) -> int:
        return self.code_bytes(shape, layout) + self.codebook_bytes(shape, layout)

    def bits_per_weight(self, shape: tuple[int, int], layout: str) -> float:
        return 8 * self.stored_bytes(shape, layout) / (shape[0] * shape[1])

    def to_json(self) -> dict:
        return {"num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size, "codebook_dtype": self.codebook_dtype}


def budget_candidates(
    shape: tuple[int, int], layout: str, codebook_dtypes: tuple[str, ...], low: float, high: float, target: float | None = None,
    scale_bytes: int = SCALE_BYTES, fast_only: bool = False,
) -> list[CodeFormat]:
    """Formats with D in PIECES and K a power of two whose bits per weight lie in [low, high], cheapest first.

    ``codebook_dtypes``: which storages to offer ("int8" and/or a 16-bit float). With ``target``, at
    most MOST_FITS (D, K) pairs are kept, those whose cheapest storage is closest to ``target``. ``fast_only``:
    only the formats the byte-permute kernels compute (``byte_permute_format``).
    """
    split, columns = split_dim(shape, layout), column_count(shape, layout)
    found: dict[tuple[int, int], list[CodeFormat]] = {}
    for piece in PIECES:
        if split % piece:
            continue
        for log_size in range(1, 17):
            size = 2**log_size
            if size > LARGEST_BUDGET_CODES or size > max(2, columns // POINTS_PER_CODE[piece]):
                break
            for dtype in codebook_dtypes:
                if fast_only and not byte_permute_format(piece, size, dtype, columns):
                    continue
                candidate = CodeFormat(split // piece, size, dtype, scale_bytes)
                if low <= candidate.bits_per_weight(shape, layout) <= high:
                    found.setdefault((piece, size), []).append(candidate)
    pairs = list(found.values())
    if target is not None:
        pairs = sorted(pairs, key=lambda c: abs(min(f.bits_per_weight(shape, layout) for f in c) - target))[:MOST_FITS]
    return sorted((f for pair in pairs for f in pair), key=lambda c: c.bits_per_weight(shape, layout))
