"""A packed head (the tied embedding's format) at a few tokens: rows decoded in registers in one kernel, per-entry scores
and a gather-sum over the codes read in place (``packed/head_scores.py``), and decoding its table in chunks for
cuBLAS, beside the dense head, on CUDA; which routes ``HEAD_FUSED_TOKENS`` and ``HEAD_SCORE_TOKENS`` should pick.

    python benchmarks/rpq/head_route.py [--json FILE]

Shapes: SmolLM2-135M's tied head (49,152 x 576) and Qwen2.5-0.5B's (151,936 x 896), in the format the default
budget gave SmolLM2's embedding (two-value vectors, 128-entry int8 tables: 7-bit codes) and in 256-entry ones
(8-bit codes, whole bytes). Device time of one call in a CUDA graph over four copies (so that the codes do not sit
in the L2 from the call before, as in a decode step), median of 3 (``rpq_kernels.graph_us``); the score route also with
its two launches as programmatic dependents (Hopper on), as a decode step launches it. At 1 and 16 tokens
also the fused kernel at other tiles, and decode + cuBLAS with other chunk sizes.
"""

from __future__ import annotations

import argparse
import json

import torch
from rpq_kernels import graph_us

from model_compress.rpq.kernels import packed, packed_forward
from model_compress.rpq.kernels.layout import code_bits, pack_codes

SHAPES = {"SmolLM2-135M": (49152, 576), "Qwen2.5-0.5B": (151936, 896)}
FORMATS = {"D2 K128 int8": (2, 128), "D2 K256 int8": (2, 256)}
TOKENS = (1, 4, 16, 64)
COPIES = 4
FUSED_TILES = ((32, 16), (64, 16), (64, 32), (128, 16), (128, 64), (256, 32))  # (rows, codebooks) per step, beside the default
CHUNKS_MB = (8, 16, 32)  # decode + cuBLAS: the most bytes of decoded table alive at once


def packed_table(vocab: int, dim: int, piece: int, size: int) -> tuple:
    books = dim // piece
    codes = pack_codes(torch.randint(0, size, (books, vocab), device="cuda"), code_bits(size))
    codebooks = torch.randint(-127, 128, (books, size, piece), device="cuda", dtype=torch.int8)
    return codes, codebooks, torch.rand(books, device="cuda", dtype=torch.float16) / 64


def routed_us(tables: list, x: torch.Tensor, vocab: int, fused_tokens: int) -> float:
    """``packed_forward.tied_head`` with its fused-or-decode bound set to ``fused_tokens`` for this measurement."""
    kept = packed_forward.HEAD_FUSED_TOKENS
    packed_forward.HEAD_FUSED_TOKENS = fused_tokens
    try:
        bits = code_bits(tables[0][1].shape[1])
        return graph_us([lambda t=t: packed_forward.tied_head(x, t[0], t[1], t[2], None, bits, vocab) for t in tables])
    finally:
        packed_forward.HEAD_FUSED_TOKENS = kept


def tile_sweep(tables: list, x: torch.Tensor, vocab: int) -> dict:
    """The fused kernel at each of FUSED_TILES, and decode + cuBLAS at each chunk size of CHUNKS_MB, microseconds."""
    bits = code_bits(tables[0][1].shape[1])
    times = {f"fused {v}x{h}": graph_us([lambda t=t, v=v, h=h: packed.packed_head(x, t[0], t[1], t[2], bits, vocab, None, v, h)
                                          for t in tables]) for v, h in FUSED_TILES}
    kept = packed_forward.HEAD_CHUNK_BYTES
    try:
        for megabytes in CHUNKS_MB:
            packed_forward.HEAD_CHUNK_BYTES = megabytes * 1024 * 1024
            times[f"decode {megabytes} MB"] = routed_us(tables, x, vocab, 0)
    finally:
        packed_forward.HEAD_CHUNK_BYTES = kept
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    rows = []
    programmatic = packed.programmatic_launch_supported(torch.device("cuda"))  # the score route's two launches overlapped
    with torch.inference_mode():
        for model, (vocab, dim) in SHAPES.items():
            dense = [torch.randn(vocab, dim, device="cuda", dtype=torch.float16) for _ in range(COPIES)]
            for name, (piece, size) in FORMATS.items():
                tables = [packed_table(vocab, dim, piece, size) for _ in range(COPIES)]
                for tokens in TOKENS:
                    x = torch.randn(tokens, dim, device="cuda", dtype=torch.float16)
                    row = {"model": model, "format": name, "tokens": tokens,
                           "dense_us": graph_us([lambda w=w: x @ w.T for w in dense]),
                           "fused_us": routed_us(tables, x, vocab, tokens),
                           "scores_us": graph_us([lambda t=t: packed.scored_head(x, t[0], t[1], t[2], code_bits(size), vocab, None)
                                                  for t in tables]),
                           "scores_programmatic_us": graph_us([lambda t=t: packed.scored_head(
                               x, t[0], t[1], t[2], code_bits(size), vocab, None, pdl=programmatic) for t in tables]),
                           "decode_cublas_us": routed_us(tables, x, vocab, 0)}
                    if tokens in (1, 16):
                        row["sweep_us"] = tile_sweep(tables, x, vocab)
                        print("    " + "  ".join(f"{key} {value:.1f}" for key, value in row["sweep_us"].items()), flush=True)
                    rows.append(row)
                    print(f"{model:13s} {name:13s} t={tokens:<3d} dense {row['dense_us']:7.1f} us  fused kernel "
                          f"{row['fused_us']:7.1f} us  scores {row['scores_us']:7.1f} / {row['scores_programmatic_us']:7.1f} us  decode + cuBLAS "
                          f"{row['decode_cublas_us']:7.1f} us", flush=True)
                del tables
            del dense
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
