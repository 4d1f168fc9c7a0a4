"""One RPQ Linear against the dense layer on the GPU, per token count: tunes the dispatch and reports ratios.

    python benchmarks/rpq/rpq_kernels.py [--tune] [--json FILE] [--codebooks 32] [--dtype float16]

Shapes are opt-1.3b's (2048->2048, 2048->8192, 8192->2048), and at one token also SmolLM2-135M's
(576->576, 576->192, 576->1536, 1536->576). Every figure is the device time of one
call inside a CUDA graph that calls many copies of the layer, each with its own weights, so that
neither launch gaps of the host nor the 50 MB L2 (which would hold one dense weight) flatter
anyone: the copies together are several times the L2. Dense = ``F.linear`` on an fp16 weight
(cuBLAS), the original layer.

``--tune`` times every candidate tile of the fused kernel (and the decode + cuBLAS path) per token
bucket, picks the route with the lowest mean ratio to dense over the bucket's shapes, prints it in
the form of ``triton_dispatch.ROUTES``, and uses it for the report that follows. The one-token
bucket is tuned per layer-size class (SmolLM2-sized, up to 2048 x 2048, larger): the best tile
differs by size. Without ``--tune`` the routes in the code are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import asdict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from model_compress.rpq.kernels import forward as kernels, triton as triton_kernels
from model_compress.rpq.kernels.config import routes as triton_dispatch
from model_compress.rpq.kernels.layout import code_bins
from model_compress.rpq.kernels.config.routes import BINNED, DECODE, FUSED, GATHER, Route, TileConfig

SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048)]
SMALL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # SmolLM2-135M, timed at one token
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
# Size classes (in * out above the first bound, up to the second) of the 1, 2-4 and 5-16 token buckets: each
# gets its own route, the smallest tuned on SmolLM2's shapes.
SIZE_CLASSES = [(0, triton_dispatch.TINY_LAYER), (triton_dispatch.TINY_LAYER, triton_dispatch.SMALL_LAYER), (triton_dispatch.SMALL_LAYER, None)]
ROTATION_BYTES = 256 * 1024 * 1024  # all copies of a layer together: five times the H100's L2
MAX_COPIES = 512  # for SmolLM2's small layers: 512 copies of the smallest RPQ layer are 59 MB, still more than the L2
TARGETS = {1: 0.5, 16: 1.0, 512: 1.3}

# Buckets: (upper token bound, token counts timed for it, candidates: tiles of the fused kernel, or DECODE).
def _tiles(block_ms, block_ns, block_ks, splits, warps=(4,), stages=(3,), kind=GATHER, early=((False, False),),
           aligned=False, local_x=(False,)) -> list[TileConfig]:
    """Every combination; ``early``: (prefetch, pdl) pairs."""
    return [
        TileConfig(m, n, k, w, s, split, kind, prefetch, pdl, aligned, local)
        for m in block_ms for n in block_ns for k in block_ks for split in splits for w in warps for s in stages
        for prefetch, pdl in early for local in local_x
    ]


EARLY = ((False, False), (True, True))
# Binned kernel: block_k is the code rows per step (with PDL and all rows in one step, the weights are
# loaded before the wait for x); split_k does not apply (a program owns its outputs). It lost every
# bucket above one token in the second round (1.7x at 4 tokens, 7.8x at 16), so it is tried for one.
# (512 rows per step and 8 warps never made the top four in the third round: dropped, as the one-token
# bucket is now tuned three times, once per size class.)
# Each also with x's row loaded whole and gathered on chip (local_x) rather than by one global load per slot.
BINNED_ONE = _tiles([1], [8, 16], [1024], [1], warps=(2, 4), kind=BINNED, early=EARLY + ((False, True),), local_x=(False, True))
ONE_TOKEN = _tiles([1], [64], [256], [8], early=EARLY[1:]) + BINNED_ONE
# 2 to 16 tokens: tuned per size class too (2048x2048 and the larger opt-1.3b shapes wanted different
# tiles, fifth round: the best common tile left one of them above the dense layer at 16 tokens; and
# 2048x2048's tile cost SmolLM2's batch-16 decode a third), on SmolLM2's shapes for the smallest class.
SMALL_SHAPE_TOKENS = [1, 4, 16]  # the token counts of the size-classed buckets: SmolLM2's shapes are timed at these
FEW_TOKEN_TILES = _tiles([16], [32, 64], [64, 128, 256], [4, 8, 16], warps=(2, 4), early=EARLY)
EVERY_SIZE = [(0, None)]
# 65 tokens and more (prompts): tensor-core tiles of whole codebooks (one or two 64-wide pieces side by
# side, or 64/128 columns of one 256-wide piece) against decode + cuBLAS. Layers up to SmolLM2's size
# keep decode + cuBLAS without being timed: their 18-wide pieces do not tile so.
PREFILL_TILES = [tile for tile in _tiles([64, 128], [64, 128], [64], [1, 2], warps=(4, 8), stages=(3, 4), aligned=True)
                 if tile.block_m * tile.block_n <= 128 * 32 * tile.num_warps]  # at most 128 fp32 accumulators a thread
ABOVE_TINY = [(triton_dispatch.TINY_LAYER, None)]
BUCKETS = [  # (bound, token counts, candidates, size classes); the one-token bucket is added in tune()
    (4, [4], FEW_TOKEN_TILES, SIZE_CLASSES),
    (16, [16], FEW_TOKEN_TILES, SIZE_CLASSES),
    (64, [64], _tiles([64], [64], [128], [2, 4], early=EARLY), EVERY_SIZE),
    (256, [128, 256], PREFILL_TILES + [DECODE], ABOVE_TINY),
    (1 << 62, [512], PREFILL_TILES + [DECODE], ABOVE_TINY),
]


def graph_us(calls: list, replays: int = 5) -> float:
    """Device microseconds per call: all ``calls`` captured in one CUDA graph, replayed, median of 3."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(calls)))
    del graph
    return statistics.median(times)


class Layers:
    """Enough copies of one shape, dense and RPQ, to overflow the L2 many times over."""

    def __init__(self, in_features: int, out_features: int, num_codebooks: int, dtype: torch.dtype) -> None:
        piece = out_features // num_codebooks
        dense_bytes = in_features * out_features * 2
        self.rpq_bytes = num_codebooks * 256 * piece * 2 + num_codebooks * in_features
        self.dense_bytes = dense_bytes
        self.dense = [
            torch.randn(out_features, in_features, device="cuda", dtype=dtype) * 0.02
            for _ in range(max(4, min(MAX_COPIES, ROTATION_BYTES // dense_bytes)))
        ]
        self.rpq = [
            (
                torch.randn(num_codebooks, 256, piece, device="cuda", dtype=dtype) * 0.02,
                torch.randint(0, 256, (num_codebooks, in_features), device="cuda", dtype=torch.uint8),
            )
            for _ in range(max(4, min(MAX_COPIES, ROTATION_BYTES // self.rpq_bytes)))
        ]
        self.bins = {id(indices): code_bins(indices, 256) for _, indices in self.rpq}  # what an RPQLinear keeps
        slots, row_codes = next(iter(self.bins.values()))
        self.bins_bytes = slots.numel() * slots.element_size() + row_codes.numel() * row_codes.element_size()
        self.codes_bytes = num_codebooks * in_features
        # What the batch-1 (binned) kernel reads: codebooks and code rows (it does not read the codes).
        self.rpq_bytes = num_codebooks * 256 * piece * 2 + slots.numel() * slots.element_size() + row_codes.numel() * row_codes.element_size()
        self.in_features = in_features
        self.dtype = dtype

    def input(self, tokens: int) -> torch.Tensor:
        return torch.randn(tokens, self.in_features, device="cuda", dtype=self.dtype)

    def dense_us(self, tokens: int) -> float:
        x = self.input(tokens)
        return graph_us([lambda w=w: F.linear(x, w) for w in self.dense])

    def rpq_us(self, tokens: int, how) -> float:
        """``how``: a TileConfig (fused kernel), DECODE, or None (the routed forward)."""
        x = self.input(tokens)
        if how is None:
            forward = lambda cb, idx: kernels.linear_forward(x, cb, idx, None, lambda: self.bins[id(idx)])  # noqa: E731
        elif how == DECODE:
            forward = lambda cb, idx: triton_kernels.linear_decode(x, cb, idx, None)  # noqa: E731
        elif how.kind == BINNED:
            forward = lambda cb, idx: triton_kernels.linear_binned(x, cb, self.bins[id(idx)], None, how)  # noqa: E731
        else:
            forward = lambda cb, idx: triton_kernels.linear_fused(x, cb, idx, None, how)  # noqa: E731
        return graph_us([lambda cb=cb, idx=idx: forward(cb, idx) for cb, idx in self.rpq])


def trio_us(layers: Layers, tile: TileConfig) -> dict:
    """q/k/v: three layers of one shape on the same one-token x: dense, RPQ one launch each, RPQ one launch for all."""
    x = layers.input(1)
    trios = [layers.rpq[i : i + 3] for i in range(0, len(layers.rpq) - 2, 3)]
    dense = [layers.dense[i : i + 3] for i in range(0, len(layers.dense) - 2, 3)]
    members = [[(cb, layers.bins[id(idx)], None) for cb, idx in trio] for trio in trios]
    separate = [lambda m=m, j=j: triton_kernels.linear_binned(x, m[j][0], m[j][1], None, tile) for m in members for j in range(3)]
    return {
        "dense_us": 3 * graph_us([lambda w=w: F.linear(x, w) for trio in dense for w in trio]),
        "separate_us": 3 * graph_us(separate),
        "grouped_us": graph_us([lambda m=m: triton_kernels.linear_binned_group(x, m, tile) for m in members]),
    }


@triton.jit
def _touch_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 1.0)


def launch_floor_us(programs: int = 256) -> float:
    """Device time per call of a kernel that only writes one value per program: the floor any layer pays."""
    out = torch.empty(programs, device="cuda")
    return graph_us([lambda: _touch_kernel[(programs,)](out) for _ in range(200)])


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second."""
    source = torch.empty(1 << 29, device="cuda", dtype=torch.float16)
    target = torch.empty_like(source)
    us = graph_us([lambda: target.copy_(source)], replays=5)
    return 2 * source.numel() * 2 / (us * 1e-6)


def in_class(shape: tuple[int, int], low: int, high: int | None) -> bool:
    return low < shape[0] * shape[1] and (high is None or shape[0] * shape[1] <= high)


def tune(layers: dict, dense: dict, only: set[int] | None = None) -> tuple[Route, ...]:
    """The best candidate per bucket and size class: lowest mean ratio to dense over its shapes and token counts.

    ``only``: tune just these token bounds and keep the active routes (the code's, or a routes file's) for the others.
    """
    routes = []
    plan = [(1, [1], ONE_TOKEN, SIZE_CLASSES)] + BUCKETS
    for bound, token_counts, candidates, classes in plan:
        if only is not None and bound not in only:
            routes += [chosen for chosen in triton_dispatch.active_routes() if chosen.max_tokens == bound]
            continue
        shapes_of = SHAPES + SMALL_SHAPES if classes is SIZE_CLASSES else SHAPES
        if classes is ABOVE_TINY:  # the smallest layers first: decode + cuBLAS, not timed
            routes.append(Route(bound, DECODE, max_weights=triton_dispatch.TINY_LAYER))
        for low, high in classes:
            shapes = [shape for shape in shapes_of if in_class(shape, low, high)]
            routes.append(tune_bucket(layers, dense, bound, token_counts, candidates, shapes, high))
    return tuple(routes)


def tune_bucket(layers: dict, dense: dict, bound: int, token_counts: list[int], candidates: list, shapes: list, max_weights: int | None) -> Route:
    """The best of ``candidates`` on ``shapes`` at ``token_counts``, printed with the runners-up and the best of each kernel."""
    scored = []
    for candidate in candidates:
        try:
            ratios = [
                layers[shape].rpq_us(tokens, candidate) / dense[shape, tokens] for shape in shapes for tokens in token_counts
            ]
        except Exception as error:  # a tile that does not compile (too many registers / shared memory)
            print(f"  skip {candidate}: {str(error).splitlines()[0][:100]}")
            continue
        scored.append((math.exp(statistics.fmean(math.log(r) for r in ratios)), candidate, ratios))
    scored.sort(key=lambda entry: entry[0])
    best_ratio, best, _ = scored[0]
    label = best if best == DECODE else best.describe()
    where = "" if max_weights is None and shapes == SHAPES else f" ({', '.join(f'{i}->{o}' for i, o in shapes)})"
    print(f"bucket <= {bound} tokens{where}: best {label}, mean ratio {best_ratio:.3f}; next "
          + ", ".join(f"{(c if c == DECODE else c.describe())} {r:.3f}" for r, c, _ in scored[1:4]))
    kinds = {c.kind for _, c, _ in scored if c != DECODE}
    for kind in sorted(kinds):  # the best of each kernel, so a losing kernel's distance shows (per shape too)
        ratio, tile, ratios = next((r, c, rs) for r, c, rs in scored if c != DECODE and c.kind == kind)
        per_shape = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"    best {kind}: {tile.describe()} {ratio:.3f} ({per_shape})")
    return Route(bound, DECODE) if best == DECODE else Route(bound, FUSED, best, max_weights)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune-bounds", default=None, help="with --tune: only these token bounds (e.g. 4,16), the code's routes for the rest")
    parser.add_argument("--json", default=None)
    parser.add_argument("--save-routes", default=None, help="with --tune: write the tuned routes here (MODEL_COMPRESS_RPQ_ROUTES reads them)")
    parser.add_argument("--codebooks", type=int, default=32)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--no-report", action="store_true", help="with --tune: stop after tuning (a later call reports)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB, torch {torch.__version__}")
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    floor = launch_floor_us()
    print(f"launch floor: {floor:.2f} us per call of a kernel that writes one value per program (256 programs, in a graph)")

    layers = {shape: Layers(*shape, args.codebooks, dtype) for shape in SHAPES + SMALL_SHAPES}
    dense = {(shape, tokens): layers[shape].dense_us(tokens) for shape in SHAPES for tokens in TOKENS}
    dense.update({(shape, tokens): layers[shape].dense_us(tokens) for shape in SMALL_SHAPES for tokens in SMALL_SHAPE_TOKENS})
    if args.tune:
        only = {int(bound) for bound in args.tune_bounds.split(",")} if args.tune_bounds else None
        routes = tune(layers, dense, only)
        print("ROUTES = (")
        for chosen in routes:
            tile = "" if chosen.tile is None else f", {chosen.tile!r}"
            sized = "" if chosen.max_weights is None else f", max_weights={chosen.max_weights}"
            print(f"    Route({chosen.max_tokens if chosen.max_tokens < 1 << 62 else '1 << 62'}, {chosen.path.upper()}{tile}{sized}),")
        print(")")
        if args.save_routes:
            triton_dispatch.save_routes(routes, args.save_routes)
        triton_dispatch.ROUTES = routes  # the report below uses the tuned routes
        if args.no_report:
            return

    rows = []
    print(f"\n{'in->out':>11} {'tokens':>6} {'route':>22} {'dense us':>9} {'rpq us':>8} {'rpq/dense':>9} {'target':>6}")
    for shape in SHAPES + SMALL_SHAPES:
        for tokens in TOKENS if shape in SHAPES else [1]:
            rpq = layers[shape].rpq_us(tokens, None)
            chosen = triton_dispatch.route(tokens, shape[0] * shape[1])
            route_name = "decode+cuBLAS" if chosen.path == DECODE else chosen.tile.describe()
            ratio = rpq / dense[shape, tokens]
            target = TARGETS.get(tokens)
            row = {"in": shape[0], "out": shape[1], "tokens": tokens, "route": route_name, "dense_us": dense[shape, tokens],
                   "rpq_us": rpq, "ratio": ratio, "target": target}
            if tokens == 1:  # and without code bins (MODEL_COMPRESS_RPQ_BINS=0): the gather tile reading the codes
                row["no_bins_us"] = layers[shape].rpq_us(1, triton_dispatch.ONE_TOKEN_GATHER)
                row["no_bins_ratio"] = row["no_bins_us"] / dense[shape, tokens]
                row["bins_bytes"], row["codes_bytes"] = layers[shape].bins_bytes, layers[shape].codes_bytes
                row["rpq_bandwidth_fraction"] = layers[shape].rpq_bytes / (rpq * 1e-6) / bandwidth
                row["dense_bandwidth_fraction"] = layers[shape].dense_bytes / (dense[shape, tokens] * 1e-6) / bandwidth
            rows.append(row)
            mark = "" if target is None else (f"<={target}" + (" ok" if ratio <= target else " MISS"))
            print(f"{shape[0]:>5}->{shape[1]:<5} {tokens:>6} {route_name:>22} {dense[shape, tokens]:9.2f} {rpq:8.2f} {ratio:9.3f} {mark:>6}")
    for row in rows:
        if row["tokens"] == 1:
            print(f"batch 1 {row['in']}->{row['out']}: RPQ reads {layers[(row['in'], row['out'])].rpq_bytes / 1e6:.2f} MB at "
                  f"{row['rpq_bandwidth_fraction']:.1%} of copy bandwidth; dense reads "
                  f"{layers[(row['in'], row['out'])].dense_bytes / 1e6:.1f} MB at {row['dense_bandwidth_fraction']:.1%}; "
                  f"without bins {row['no_bins_us']:.2f} us ({row['no_bins_ratio']:.3f}); bins {row['bins_bytes'] / 1e3:.0f} kB "
                  f"beside {row['codes_bytes'] / 1e3:.0f} kB of codes")
    trios = {}
    for shape in SHAPES:
        one_token = triton_dispatch.route(1, 3 * shape[0] * shape[1])  # the group's route: three layers' weights
        if one_token.path == FUSED and one_token.tile.kind == BINNED:
            trios[f"{shape[0]}->{shape[1]}"] = trio = trio_us(layers[shape], one_token.tile)
            print(f"q/k/v-like trio {shape[0]}->{shape[1]}, 1 token: dense {trio['dense_us']:.2f} us, RPQ separate "
                  f"{trio['separate_us']:.2f} us ({trio['separate_us'] / trio['dense_us']:.3f}), RPQ one launch "
                  f"{trio['grouped_us']:.2f} us ({trio['grouped_us'] / trio['dense_us']:.3f})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": props.name, "torch": torch.__version__, "copy_bandwidth": bandwidth, "launch_floor_us": floor, "codebooks": args.codebooks,
                       "dtype": args.dtype, "routes": [asdict(r) for r in triton_dispatch.active_routes()], "rows": rows,
                       "trios": trios}, handle, indent=1)


if __name__ == "__main__":
    main()
