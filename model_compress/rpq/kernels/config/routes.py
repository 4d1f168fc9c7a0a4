"""Which GPU path and tile sizes an RPQ call takes, by token count: a table measured on the device.

The numbers come from ``benchmarks/rpq/rpq_kernels.py --tune`` on an H100 (benchmarks/RESULTS.md,
"RPQ GPU kernels"): for each token bucket it timed every candidate tile on the opt-1.3b shapes
(2048->2048, 2048->8192, 8192->2048, fp16, M=32, K=256) and the decode + cuBLAS path, and kept
the one with the lowest mean ratio to the dense layer; the one-token bucket per layer-size class
(SmolLM2-135M's shapes for the smallest), the 2-4 and 5-16 token buckets per class too (2048x2048 and
larger; SmolLM2-sized layers keep the tiles tuned before the split). Plain data, so that it imports without Triton.

Another GPU may want other tiles: ``rpq_kernels.py --tune --save-routes FILE`` measures them there,
and ``MODEL_COMPRESS_RPQ_ROUTES=FILE`` makes every RPQ layer use them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from . import options

FUSED = "fused"
DECODE = "decode"
GATHER = "gather"  # fused kernel: codebook rows gathered into each tile
BINNED = "binned"  # one-token kernel: x summed over the inputs of each code (layout.code_bins), times that codebook row


@dataclass(frozen=True)
class TileConfig:
    """One launch shape of the fused kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1  # programs sharing one output tile, each over a slice of the inputs (more parallelism for few tokens)
    kind: str = GATHER
    prefetch: bool = False  # gather kernel: L2 prefetch of the program's codes and codebook slice before anything waits
    pdl: bool = False  # programmatic dependent launch (Hopper on): weights prefetched while the previous kernel ends
    # Whole-codebook tiles only: BLOCK_N spans whole codebooks (or lies inside one). A layer whose pieces
    # do not tile so (not a power of two) takes decode + cuBLAS instead: the large-batch tiles were
    # measured on aligned tiles, and the other form loads one code per output.
    aligned: bool = False
    # Binned kernel: x's row loaded whole (one coalesced load) and gathered on chip, instead of one global
    # load per slot. Registers grow with in_features (up to 8192 inputs in the tuned shapes).
    local_x: bool = False

    @property
    def use_dot(self) -> bool:
        """Tensor cores need 16 rows; fewer tokens take the broadcast multiply-sum."""
        return self.block_m >= 16

    def describe(self) -> str:
        prefix = "binned " if self.kind == BINNED else ""
        suffix = (" pf" if self.prefetch else "") + (" pdl" if self.pdl else "") + (" aligned" if self.aligned else "") + (" local-x" if self.local_x else "")
        return f"{prefix}m{self.block_m} n{self.block_n} k{self.block_k} w{self.num_warps} s{self.num_stages} split{self.split_k}{suffix}"


def heads_per_tile(piece: int, block_n: int) -> int:
    """How many whole codebooks one output tile of ``block_n`` columns holds: 1 when it lies inside one,
    2 when it is two side by side (pieces of 8 or more, a power of two: each gathered row is whole
    16-byte vectors), 0 otherwise (tiles straddle codebooks: one code load per output). Tiles of four
    pieces, gathered as one (block_k x block_n) tensor, measured 1.7-2.3x slower than two (H100): the
    codes' layout change costs every K step."""
    if piece % block_n == 0:
        return 1
    if block_n == 2 * piece and piece >= 8 and piece & (piece - 1) == 0:
        return 2
    return 0


@dataclass(frozen=True)
class Route:
    """The path for calls of up to ``max_tokens`` tokens (and, with ``max_weights``, only for layers that small).

    ``max_weights``: in * out of the layer (summed over the siblings of one grouped launch). The
    best tile depends on the layer's size as well as on the token count: a small layer has too few
    programs to hide what a big one hides (PDL measured slower at 2048 x 2048, faster at 2048 x
    8192 for one token; long K steps with prefetch win at 2048 x 2048 for 2-16 tokens, short ones
    at 2048 x 8192), so those buckets are tuned per size class.
    """

    max_tokens: int
    path: str
    tile: TileConfig | None = None
    max_weights: int | None = None


# Upper token bounds with their route; the last bound catches everything larger.
# Size classes: up to SmolLM2-135M's MLP projections, up to opt-1.3b's attention projections, larger.
TINY_LAYER = 1536 * 576
SMALL_LAYER = 2048 * 2048
ROUTES: tuple[Route, ...] = (
    # One token: x's row loaded whole and gathered on chip (local_x) won every class (H100).
    Route(1, FUSED, TileConfig(1, 16, 1024, num_warps=4, num_stages=3, kind=BINNED, prefetch=True, pdl=True, local_x=True), max_weights=TINY_LAYER),
    Route(1, FUSED, TileConfig(1, 16, 1024, num_warps=2, num_stages=3, kind=BINNED, prefetch=True, pdl=True, local_x=True), max_weights=SMALL_LAYER),
    Route(1, FUSED, TileConfig(1, 16, 1024, num_warps=4, num_stages=3, kind=BINNED, pdl=True, local_x=True)),
    # SmolLM2-sized layers keep the tiles of the single table (the 2048x2048 tile cost SmolLM2 a third of its b16 decode).
    Route(4, FUSED, TileConfig(16, 64, 64, num_warps=4, num_stages=3, split_k=8), max_weights=TINY_LAYER),
    Route(4, FUSED, TileConfig(16, 64, 256, num_warps=4, num_stages=3, split_k=16, prefetch=True, pdl=True), max_weights=SMALL_LAYER),
    Route(4, FUSED, TileConfig(16, 64, 64, num_warps=4, num_stages=3, split_k=8)),
    Route(16, FUSED, TileConfig(16, 32, 128, num_warps=4, num_stages=3, split_k=8), max_weights=TINY_LAYER),
    Route(16, FUSED, TileConfig(16, 64, 256, num_warps=4, num_stages=3, split_k=16, prefetch=True, pdl=True), max_weights=SMALL_LAYER),
    Route(16, FUSED, TileConfig(16, 32, 256, num_warps=2, num_stages=3, split_k=4)),
    Route(64, FUSED, TileConfig(64, 64, 128, num_warps=4, num_stages=3, split_k=4, prefetch=True, pdl=True)),
    Route(1 << 62, DECODE),
)

# One token without code bins (``MODEL_COMPRESS_RPQ_BINS=0``, or codebooks the binned kernel does not
# take): the best gather tile of the one-token tuning (0.77 of dense against the binned kernel's 0.50).
ONE_TOKEN_GATHER = TileConfig(1, 64, 256, num_warps=4, num_stages=3, split_k=8, prefetch=True, pdl=True)

# Tied LM head: the per-code score kernel up to this many tokens, then decode the table in chunks + cuBLAS.
TIED_HEAD_SCORE_TOKENS = 16
# Rows of the table decoded per chunk on the decode path keep that temporary under this size: it is
# live during a prompt's forward, so it adds to the peak of a whole generation (8 MiB keeps each
# chunk's GEMM 2048 x 2048 or larger at opt-1.3b's width).
DECODE_CHUNK_BYTES = 8 * 1024 * 1024


def save_routes(routes: tuple[Route, ...], path: str | Path) -> None:
    """Write routes as JSON (what ``--save-routes`` produces and ``MODEL_COMPRESS_RPQ_ROUTES`` reads)."""
    Path(path).write_text(json.dumps([asdict(chosen) for chosen in routes], indent=1))


def load_routes(path: str | Path) -> tuple[Route, ...]:
    """Routes from a JSON file written by :func:`save_routes`."""
    entries = json.loads(Path(path).read_text())
    return tuple(
        Route(entry["max_tokens"], entry["path"], TileConfig(**entry["tile"]) if entry.get("tile") else None, entry.get("max_weights"))
        for entry in entries
    )


def active_routes() -> tuple[Route, ...]:
    """The measured table, or the routes file the options name (``MODEL_COMPRESS_RPQ_ROUTES``)."""
    path = options.current().routes_file
    return _routes_in(path) if path else ROUTES


@functools.cache
def _routes_in(path: Path) -> tuple[Route, ...]:
    return load_routes(path)


def route(tokens: int, weights: int | None = None, routes: tuple[Route, ...] | None = None) -> Route:
    """The route for a call with ``tokens`` rows on a layer of ``weights`` = in * out (None: no size class)."""
    routes = routes or active_routes()
    for candidate in routes:
        sized = candidate.max_weights is None or (weights is not None and weights <= candidate.max_weights)
        if tokens <= candidate.max_tokens and sized:
            return candidate
    return routes[-1]


def bins_enabled() -> bool:
    """Whether one-token calls may use the binned kernel (its code bins cost 2-4 bytes per code beside the codes)."""
    return options.current().bins
