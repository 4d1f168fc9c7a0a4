"""bf16 tokens through the byte-permute kernels against the general kernels they replace, dense bf16 cuBLAS and the
same kernels on fp16 tokens: one layer, one and 16 tokens, 4-bit codes with one 16-entry int8 table per row.

    python benchmarks/rpq/nibble_bf16.py [--json FILE]

One fp16 token multiplies in fp16 pairs inside the lookup; a bf16 one takes the looked-up values to float32 first,
so the one-token figure is the one this measures. Times are device time inside CUDA graphs over copies that overflow
the L2 (``packed_kernels.PackedLayers``).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from packed_kernels import PackedLayers, copies_for
from rpq_kernels import graph_us

from model_compress.rpq.kernels import packed, packed_forward
from model_compress.rpq.kernels.config.packed_routes import NIBBLE_ROUTES, packed_tile

SHAPES = [(576, 1536), (1536, 576), (4096, 11008), (11008, 4096)]


def dense_us(shape: tuple[int, int], tokens: int, dtype: torch.dtype) -> float:
    in_features, out_features = shape
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=dtype) * 0.02
               for _ in range(copies_for(2 * in_features * out_features))]
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    return graph_us([lambda w=w: F.linear(x, w) for w in weights])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        layers = PackedLayers(*shape, 1, 16)
        programs = packed_forward.multiprocessors(torch.device("cuda"))
        for tokens in (1, 16):
            row = {"shape": shape, "tokens": tokens}
            for dtype in (torch.bfloat16, torch.float16):
                x = layers.input(tokens, dtype)
                copies = [(c, b, s.to(dtype)) for c, b, s in layers.copies]
                name = str(dtype).removeprefix("torch.")
                row[f"dense_{name}_us"] = dense_us(shape, tokens, dtype)
                row[f"byte_permute_{name}_us"] = graph_us([lambda c=c: packed.nibble_linear(
                    x, *c, None, 4, shape[0], packed_tile(tokens, NIBBLE_ROUTES), programs) for c in copies])
                row[f"general_{name}_us"] = graph_us([lambda c=c: packed.packed_linear(
                    x, *c, None, 4, shape[0], packed_tile(tokens), programs) for c in copies])
            rows.append(row)
            print(f"{shape[0]}->{shape[1]} t={tokens}: bf16 dense {row['dense_bfloat16_us']:.1f} us, byte-permute "
                  f"{row['byte_permute_bfloat16_us']:.1f}, general {row['general_bfloat16_us']:.1f}; fp16 dense "
                  f"{row['dense_float16_us']:.1f}, byte-permute {row['byte_permute_float16_us']:.1f}, general "
                  f"{row['general_float16_us']:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
