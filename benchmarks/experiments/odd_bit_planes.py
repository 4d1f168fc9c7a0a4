"""Would a bit-plane layout make 3-, 5-, 6- and 7-bit codes as fast as 4-bit ones? One-token GEMV, per-row int8 tables.

    python benchmarks/experiments/odd_bit_planes.py [--json FILE]

The stored layout packs b-bit codes little-endian along a row, so a 3- or 5-bit code can straddle two bytes and
the kernel reads it code by code (``packed/codes.unpack``): at Llama-2-7B's shapes those layers measured about 3x
slower than 4-bit ones (H100, 2026-12-06). Split each code into planes of 4, 2 and 1 bits (3 = 2 + 1, 5 = 4 + 1,
6 = 4 + 2, 7 = 4 + 2 + 1), each plane packed on its own: every plane then reads as whole byte tiles
(``packed/codes.unpack_tile``) and the code is their sum. Same bytes per row where the width is a multiple of 8.
This times the routed stream kernel against a plane kernel written here (same tile, same split), checks that both
give the same output, and prints the ratio; the product would change its stored layout only if this wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rpq"))
from rpq_kernels import graph_us  # noqa: E402

from model_compress.rpq.kernels import packed_forward  # noqa: E402
from model_compress.rpq.kernels.config.packed_routes import packed_tile  # noqa: E402
from model_compress.rpq.kernels.layout import pack_codes  # noqa: E402
from model_compress.rpq.kernels.packed.codes import row_pointers, unpack_tile  # noqa: E402
from model_compress.rpq.kernels.packed.linear import input_split  # noqa: E402
from model_compress.rpq.kernels.triton.common import _cdiv, _store_tile, tile_counters  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]
PLANES = {3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1)}
COPIES_BYTES = 256 * 1024 * 1024


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(M, n) codes -> planes of PLANES[bits] bits, low bits first, each packed little-endian, side by side per row."""
    parts, shift = [], 0
    for width in PLANES[bits]:
        parts.append(pack_codes((codes >> shift) & ((1 << width) - 1), width))
        shift += width
    return torch.cat(parts, 1).contiguous()


@triton.jit
def _plane_codes(row_ptrs, first, columns, mask_n, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes of one tile from up to three planes (width 0: absent), each read as byte tiles."""
    codes = unpack_tile(row_ptrs, first, (columns * P0 + 7) // 8, mask_n, P0, BLOCK_K)
    offset = (columns * P0 + 7) // 8
    if P1 > 0:
        codes = codes | (unpack_tile(row_ptrs + offset, first, (columns * P1 + 7) // 8, mask_n, P1, BLOCK_K) << P0)
        offset += (columns * P1 + 7) // 8
    if P2 > 0:
        codes = codes | (unpack_tile(row_ptrs + offset, first, (columns * P2 + 7) // 8, mask_n, P2, BLOCK_K) << (P0 + P1))
    return codes


@triton.jit
def _plane_gemv_kernel(x_ptr, codes_ptr, codebooks_ptr, scales_ptr, out_ptr, partial_ptr, counter_ptr, in_features,
                       out_features, code_width, split_k, chunk_k, CODEBOOK_SIZE: tl.constexpr, P0: tl.constexpr,
                       P1: tl.constexpr, P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_features
    _, code_rows, value_rows = row_pointers(codes_ptr, codebooks_ptr, offs_n, code_width, CODEBOOK_SIZE, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_begin = pid_k * chunk_k
    k_end = tl.minimum(k_begin + chunk_k, in_features)
    for step in range(0, chunk_k, BLOCK_K):
        offs_k = k_begin + step + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        codes = _plane_codes(code_rows, k_begin + step, in_features, mask_n, P0, P1, P2, BLOCK_K)
        w = tl.load(value_rows + codes, mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
    sums = tl.sum(acc, axis=1) * tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    one = tl.arange(0, 1)
    _store_tile(sums[None, :], partial_ptr, counter_ptr, out_ptr, out_ptr, one, offs_n, one < 1, mask_n, 1, out_features,
                out_features, split_k, False, SPLIT, 1, BLOCK_N)


def plane_gemv(x: torch.Tensor, planes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The routed one-token tile and split, on the plane layout."""
    tile = packed_tile(1)
    out_features, in_features = codebooks.shape[0], x.shape[-1]
    out = torch.empty(1, out_features, device=x.device, dtype=x.dtype)
    tiles = _cdiv(out_features, tile.block_n)
    split, chunk = input_split(in_features, tiles, tile, packed_forward.multiprocessors(x.device))
    partial = torch.empty(split * out_features, device=x.device, dtype=torch.float32) if split > 1 else out
    counter = tile_counters(tiles, x.device) if split > 1 else out
    widths = PLANES[bits] + (0,) * (3 - len(PLANES[bits]))
    _plane_gemv_kernel[(tiles, 1, split)](
        x, planes, codebooks, scales, out, partial, counter, in_features, out_features, planes.shape[1], split, chunk,
        CODEBOOK_SIZE=codebooks.shape[1], P0=widths[0], P1=widths[1], P2=widths[2], BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, SPLIT=split > 1, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    rows = []
    for in_features, out_features in SHAPES:
        x = torch.randn(1, in_features, device="cuda", dtype=torch.float16)
        for bits, planes_of in PLANES.items():
            size = 1 << bits
            copies = max(4, min(64, COPIES_BYTES // (out_features * in_features * bits // 8)))
            layers = []
            for _ in range(copies):
                codes = torch.randint(0, size, (out_features, in_features), device="cuda")
                layers.append((pack_codes(codes, bits), pack_planes(codes, bits),
                               torch.randint(-127, 128, (out_features, size, 1), device="cuda", dtype=torch.int8),
                               torch.rand(out_features, device="cuda", dtype=torch.float16) / 64))
            stream, planes, codebooks, scales = layers[0]
            want = packed_forward.linear(x, stream, codebooks, scales, None, bits, in_features)
            got = plane_gemv(x, planes, codebooks[..., 0].contiguous(), scales, bits)
            error = ((got.float() - want.float()).norm() / want.float().norm()).item()
            stream_us = graph_us([lambda s=s, c=c, k=k: packed_forward.linear(x, s, c, k, None, bits, in_features)
                                  for s, _, c, k in layers])
            flat = [(p, c[..., 0].contiguous(), k) for _, p, c, k in layers]
            plane_us = graph_us([lambda p=p, c=c, k=k: plane_gemv(x, p, c, k, bits) for p, c, k in flat])
            rows.append({"shape": [in_features, out_features], "bits": bits, "planes": list(planes_of), "stream_us": stream_us,
                         "plane_us": plane_us, "speedup": stream_us / plane_us, "rel_error": error})
            print(f"{in_features:>5}->{out_features:<5} {bits}-bit (planes {planes_of}): stream {stream_us:7.1f} us, "
                  f"planes {plane_us:7.1f} us ({stream_us / plane_us:4.2f}x), rel. difference {error:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
