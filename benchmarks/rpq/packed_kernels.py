"""One packed RPQ Linear (the formats the bit budget picks) against the dense cuBLAS layer and torch's int4
weight-only matmul, on the GPU, per token count; ``--sweep`` searches the tiles of ``config/packed_routes.py``,
``--nibble-sweep`` those of the byte-permute kernels for 4-bit codes (``NIBBLE_ROUTES``), ``--prompt-sweep`` only
the prompt kernel's tiles against decode + cuBLAS at 128, 512 and 2,048 tokens.

    python benchmarks/rpq/packed_kernels.py [--sweep] [--nibble-sweep] [--prompt-sweep] [--json FILE]

Shapes: SmolLM2-135M's (576->576, 576->192, 576->1536, 1536->576) and Llama-2-7B's (4096->4096, 4096->11008,
11008->4096). Formats: one table of 16 int8 values per output row (4-bit codes, what the default budget picks most),
8 and 32 entries (3 and 5 bits), and two-row vectors of 256 entries (D=2, 8-bit codes). Every figure is the device
time of one call inside a CUDA graph that calls enough copies of the layer, each with its own weights, to overflow
the L2 (``rpq_kernels.graph_us``). The rotation x R is timed apart (a layer group shares it). The int4 baseline is
``torch.ops.aten._weight_int4pack_mm`` at groups of 128 in bfloat16 (gpt-fast's and torchao's kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from rpq_kernels import copy_bandwidth, graph_us, launch_floor_us

from model_compress.rpq.kernels import packed, packed_forward, rotation
from model_compress.rpq.kernels.config import options
from model_compress.rpq.kernels.config.packed_routes import NIBBLE_ROUTES, PACKED_ROUTES, PackedTile, packed_tile
from model_compress.rpq.kernels.layout import code_bits, pack_codes

SMALL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LARGE_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
FORMATS = {"D1 K16 int8": (1, 16), "D1 K8 int8": (1, 8), "D1 K32 int8": (1, 32), "D2 K256 int8": (2, 256)}
BYTE_PERMUTE_FORMATS = ("D1 K16 int8", "D1 K32 int8")  # routed to the byte-permute kernels up to 64 tokens
TOKENS = [1, 4, 16, 64, 512]
L2_OVERFLOW_BYTES = 256 * 1024 * 1024  # the copies of one layer together: five times an H100's or H200's L2
MAX_COPIES = 64


def copies_for(layer_bytes: int) -> int:
    return max(4, min(MAX_COPIES, L2_OVERFLOW_BYTES // max(1, layer_bytes)))


class PackedLayers:
    """Copies of one packed layer (random codes, int8 codebooks, scales) and of its dense and int4 counterparts."""

    def __init__(self, in_features: int, out_features: int, piece: int, size: int) -> None:
        self.shape = (in_features, out_features)
        self.bits = code_bits(size)
        books = out_features // piece
        self.bytes = books * -(-in_features * self.bits // 8) + books * size * piece + 2 * books
        self.copies = [
            (
                pack_codes(torch.randint(0, size, (books, in_features), device="cuda"), self.bits),
                torch.randint(-127, 128, (books, size, piece), device="cuda", dtype=torch.int8),
                torch.rand(books, device="cuda", dtype=torch.float16) / 64,
            )
            for _ in range(copies_for(self.bytes))
        ]

    def input(self, tokens: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return torch.randn(tokens, self.shape[0], device="cuda", dtype=dtype)

    def routed_us(self, tokens: int, **changes) -> float:
        """The routed call; ``changes`` to the RPQ options (for example ``fused_prompts=False``) while it is captured."""
        x = self.input(tokens)
        with options.using(**changes):
            return graph_us([lambda c=c: packed_forward.linear(x, *c, None, self.bits, self.shape[0]) for c in self.copies])

    def prompt_us(self, tokens: int, tile: PackedTile) -> float:
        """fp16 prompt tokens through the tensor-core prompt kernel on ``tile``."""
        x = self.input(tokens)
        return graph_us([lambda c=c: packed.nibble_prompt_linear(x, *c, None, self.bits, self.shape[0], tile) for c in self.copies])

    def nibble_us(self, tokens: int, tile: PackedTile) -> float:
        """fp16 tokens through the byte-permute kernels (4- or 5-bit codes, 16- or 32-entry int8 tables) on ``tile``."""
        x = self.input(tokens)
        programs = packed_forward.multiprocessors(x.device)
        return graph_us([lambda c=c: packed.nibble_linear(x, *c, None, self.bits, self.shape[0], tile, programs) for c in self.copies])

    def tile_us(self, tokens: int, tile: PackedTile) -> float:
        x = self.input(tokens)
        programs = packed_forward.multiprocessors(x.device)
        return graph_us([lambda c=c: packed.packed_linear(x, *c, None, self.bits, self.shape[0], tile, programs) for c in self.copies])


def dense_us(shape: tuple[int, int], tokens: int) -> float:
    in_features, out_features = shape
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.float16) * 0.02
               for _ in range(copies_for(2 * in_features * out_features))]
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
    return graph_us([lambda w=w: F.linear(x, w) for w in weights])


def int4_us(shape: tuple[int, int], tokens: int) -> float | str:
    """torch's int4 weight-only matmul, groups of 128, bfloat16; a reason where this torch build lacks it."""
    in_features, out_features = shape
    try:
        layers = []
        for _ in range(copies_for(in_features * out_features // 2)):
            nibbles = torch.randint(0, 16, (out_features, in_features), device="cuda", dtype=torch.int32)
            packed_nibbles = (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(torch.uint8)
            weight = torch.ops.aten._convert_weight_to_int4pack(packed_nibbles, 8)
            scales = torch.rand(in_features // 128, out_features, 2, device="cuda", dtype=torch.bfloat16)
            layers.append((weight, scales))
        x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
        return graph_us([lambda w=w, s=s: torch.ops.aten._weight_int4pack_mm(x, w, 128, s) for w, s in layers])
    except Exception as error:  # noqa: BLE001 - report why the baseline is missing, measure the rest
        return f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


def rotation_us(width: int, tokens: int) -> float:
    signs = rotation.random_signs(width, 0).to("cuda", torch.float16)
    xs = [torch.randn(tokens, width, device="cuda", dtype=torch.float16) for _ in range(16)]
    return graph_us([lambda x=x: packed.rotate(x, signs, 64) for x in xs])


def sweep_candidates(tokens: int) -> list[PackedTile]:
    if tokens == 1:
        return [PackedTile(1, n, k, num_warps=w, num_stages=2, max_split=32, programs_per_sm=p)
                for n, k in ((4, 512), (8, 256), (8, 512), (16, 256), (16, 512), (32, 256)) for w in (2, 4) for p in (8, 32)]
    block_m = 16 if tokens <= 16 else 64
    return [PackedTile(block_m, n, k, num_warps=4, num_stages=3, max_split=16, programs_per_sm=p)
            for n, k in ((32, 64), (32, 128), (64, 64), (64, 128)) for p in (4, 16)]


def sweep(layers: dict, dense: dict) -> dict:
    """Per token bucket, the tile with the lowest mean time ratio to dense over every shape (default format)."""
    chosen = {}
    for tokens in (1, 16, 64):
        scores = []
        shapes = SMALL_SHAPES + LARGE_SHAPES
        for tile in sweep_candidates(tokens):
            ratios = [layers[(shape, "D1 K16 int8")].tile_us(tokens, tile) / dense[(shape, tokens)] for shape in shapes]
            scores.append((statistics.mean(ratios), tile, ratios))
            print(f"  sweep tokens={tokens} {tile.describe()}: mean ratio to dense {scores[-1][0]:.3f}", flush=True)
        best = min(scores, key=lambda s: s[0])
        per_shape = {f"{a}x{b}": min(scores, key=lambda s: s[2][i])[1].describe() for i, (a, b) in enumerate(shapes)}
        chosen[tokens] = {"tile": best[1].__dict__, "mean_ratio_to_dense": best[0], "best_per_shape": per_shape,
                          "all": [(tile.__dict__, ratios) for _, tile, ratios in scores]}
        print(f"best tokens={tokens}: {best[1].describe()} ({best[0]:.3f} of dense)", flush=True)
    return chosen


NIBBLE_CANDIDATES = {
    1: [PackedTile(1, n, k, num_warps=w, num_stages=2, max_split=32, programs_per_sm=p)
        for n, k, w, p in ((4, 512, 4, 8), (8, 256, 4, 8), (8, 512, 4, 8), (8, 512, 4, 16), (8, 1024, 4, 8), (16, 256, 4, 8),
                           (16, 512, 4, 8), (16, 512, 8, 8), (32, 256, 8, 8), (32, 512, 8, 4), (4, 1024, 2, 16), (8, 512, 2, 16))],
    16: [PackedTile(16, n, k, num_warps=w, num_stages=s, max_split=16, programs_per_sm=p)
         for n, k, w, s, p in ((32, 256, 4, 2, 4), (64, 128, 4, 2, 4), (64, 256, 4, 2, 4), (32, 512, 4, 2, 4), (128, 128, 8, 2, 4),
                               (64, 256, 8, 3, 2), (32, 256, 4, 2, 8))],
    64: [PackedTile(64, n, k, num_warps=w, num_stages=2, max_split=16, programs_per_sm=4)
         for n, k, w in ((64, 128, 4), (64, 256, 8), (128, 128, 8), (32, 256, 4))],
}


# Prompts on tensor cores with W' looked up as the left operand (``packed/nibble_prompts.py``) against decode + cuBLAS.
PROMPT_TILES = [PackedTile(m, n, k, num_warps=w, num_stages=st, max_split=1, programs_per_sm=1)
                for m, n, k, w, st in ((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (256, 128, 64, 8, 3),
                                       (128, 128, 128, 8, 2), (128, 256, 64, 8, 3), (256, 64, 64, 8, 3), (64, 64, 128, 4, 3))]
PROMPT_TOKENS = (128, 512, 2048)


def prompt_sweep(layers: dict) -> dict:
    """Per format and token count: dense, the decode + cuBLAS route and every prompt tile, on every shape; the tile
    with the lowest mean time ratio to dense over the shapes."""
    shapes = SMALL_SHAPES + LARGE_SHAPES
    found = {}
    for name in BYTE_PERMUTE_FORMATS:
        for tokens in PROMPT_TOKENS:
            dense = [dense_us(shape, tokens) for shape in shapes]
            decoded = [layers[(shape, name)].routed_us(tokens, fused_prompts=False) / d for shape, d in zip(shapes, dense)]
            scores = []
            for tile in PROMPT_TILES:
                ratios = [layers[(shape, name)].prompt_us(tokens, tile) / d for shape, d in zip(shapes, dense)]
                scores.append((statistics.mean(ratios), tile, ratios))
                print(f"  prompts {name} t={tokens} {tile.describe()}: mean ratio to dense {scores[-1][0]:.3f} "
                      f"({' '.join(f'{r:.2f}' for r in ratios)})", flush=True)
            best = min(scores, key=lambda s: s[0])
            print(f"prompts {name} t={tokens}: decode + cuBLAS {statistics.mean(decoded):.3f} of dense "
                  f"({' '.join(f'{r:.2f}' for r in decoded)}); best tile {best[1].describe()} {best[0]:.3f} "
                  f"({' '.join(f'{r:.2f}' for r in best[2])})", flush=True)
            found[f"{name} t={tokens}"] = {"dense_us": dict(zip(map(str, shapes), dense)), "decode_cublas_ratios": decoded,
                                           "best_tile": best[1].__dict__, "best_ratios": best[2],
                                           "all": [(tile.__dict__, ratios) for _, tile, ratios in scores]}
    return found


def nibble_sweep(layers: dict, dense: dict) -> dict:
    """The byte-permute kernels' tiles per token bucket: the lowest mean time ratio to dense over every shape."""
    shapes = SMALL_SHAPES + LARGE_SHAPES
    chosen = {}
    for tokens, candidates in NIBBLE_CANDIDATES.items():
        scores = []
        for tile in candidates:
            ratios = [layers[(shape, "D1 K16 int8")].nibble_us(tokens, tile) / dense[(shape, tokens)] for shape in shapes]
            scores.append((statistics.mean(ratios), tile, ratios))
            print(f"  nibble sweep t={tokens} {tile.describe()}: mean ratio to dense {scores[-1][0]:.3f} "
                  f"({' '.join(f'{r:.2f}' for r in ratios)})", flush=True)
        best = min(scores, key=lambda s: s[0])
        print(f"best nibble tile t={tokens}: {best[1].describe()} ({best[0]:.3f} of dense; per shape "
              f"{' '.join(f'{r:.2f}' for r in best[2])})", flush=True)
        chosen[tokens] = {"tile": best[1].__dict__, "mean_ratio_to_dense": best[0],
                          "best_per_shape": {f"{a}x{b}": min(scores, key=lambda s: s[2][i])[1].describe()
                                             for i, (a, b) in enumerate(shapes)},
                          "all": [(tile.__dict__, ratios) for _, tile, ratios in scores]}
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="search the tiles per token bucket first")
    parser.add_argument("--nibble-sweep", action="store_true", help="search the one-token byte-permute kernel's tiles first")
    parser.add_argument("--prompt-sweep", action="store_true",
                        help="only the prompt route: decode + cuBLAS against the tensor-core prompt kernel's tiles")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="token counts to time (default: all)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    device = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    report = {"device": device.name, "torch": torch.__version__, "copy_bandwidth_gb_s": bandwidth / 1e9,
              "launch_floor_us": launch_floor_us(), "routes": [(t, tile.__dict__) for t, tile in PACKED_ROUTES], "rows": []}
    print(f"{device.name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, launch floor {report['launch_floor_us']:.2f} us", flush=True)
    shapes = SMALL_SHAPES + LARGE_SHAPES
    if args.prompt_sweep:
        layers = {(shape, name): PackedLayers(*shape, *FORMATS[name]) for shape in shapes for name in BYTE_PERMUTE_FORMATS}
        report["prompt_sweep"] = prompt_sweep(layers)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1)
        return
    tokens_timed = sorted(set(args.tokens) | ({1, 16, 64} if args.sweep or args.nibble_sweep else set()))
    dense = {(shape, tokens): dense_us(shape, tokens) for shape in shapes for tokens in tokens_timed}
    layers = {(shape, name): PackedLayers(*shape, *FORMATS[name]) for shape in shapes for name in FORMATS}
    if args.sweep:
        report["sweep"] = sweep(layers, dense)
    if args.nibble_sweep:
        report["nibble_sweep"] = nibble_sweep(layers, dense)
    for shape in shapes:
        for tokens in args.tokens:
            int4 = int4_us(shape, tokens) if shape in LARGE_SHAPES else None
            rotate = rotation_us(shape[0], tokens)
            for name in FORMATS:
                layer = layers[(shape, name)]
                us = layer.routed_us(tokens)
                read = layer.bytes + 2 * tokens * (shape[0] + shape[1])
                row = {"shape": shape, "tokens": tokens, "format": name, "bits": layer.bits, "dense_us": dense[(shape, tokens)],
                       "rpq_us": us, "speedup_vs_dense": dense[(shape, tokens)] / us, "rotation_us": rotate,
                       "route": "decode+cuBLAS" if packed_tile(tokens) is None else packed_tile(tokens).describe(),
                       "bandwidth_fraction": read / (us * 1e-6) / bandwidth, "int4_us": int4}
                if isinstance(int4, float):
                    row["speed_vs_int4"] = int4 / us
                if tokens <= 64 and name in BYTE_PERMUTE_FORMATS:  # the byte-permute route against the general kernels
                    row["route"] = "byte-permute " + packed_tile(tokens, NIBBLE_ROUTES).describe()
                    row["general_us"] = layer.tile_us(tokens, packed_tile(tokens))
                elif name in BYTE_PERMUTE_FORMATS:  # prompts: the routed call against decode + cuBLAS
                    row["route"] = "prompts"
                    row["decode_cublas_us"] = layer.routed_us(tokens, fused_prompts=False)
                report["rows"].append(row)
                extra = f" int4 {int4:8.1f} us ({int4 / us:4.2f}x)" if isinstance(int4, float) else (f" int4 {int4}" if int4 else "")
                print(f"{shape[0]:>5}->{shape[1]:<5} t={tokens:<4} {name:13} dense {row['dense_us']:8.1f} us  rpq {us:8.1f} us "
                      f"({row['speedup_vs_dense']:4.2f}x dense, {row['bandwidth_fraction']:4.0%} of copy bw)  rotation {rotate:5.1f} us{extra}"
                      + (f"  general kernel {row['general_us']:6.1f} us" if "general_us" in row else "")
                      + (f"  decode + cuBLAS {row['decode_cublas_us']:6.1f} us" if "decode_cublas_us" in row else ""),
                      flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
