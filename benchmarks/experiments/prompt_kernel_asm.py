"""Why is the prompt kernel slower than cuBLAS? What Triton made of it (tensor-core instruction, registers, spills,
shared memory) and the same tile as a plain Triton fp16 GEMM of an already decoded W' (no lookup): if the plain tile
is as slow, the tile and Triton's GEMM are the limit; if it is fast, the lookup is.

    python benchmarks/experiments/prompt_kernel_asm.py [--tokens 512] [--json FILE]

Shapes: Llama-2-7B's 4096->11008 and 11008->4096; every time is device time inside a CUDA graph (``graph_us``), with
cuBLAS beside.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from rpq_kernels import graph_us

from model_compress.rpq.kernels import packed
from model_compress.rpq.kernels.config.packed_routes import PackedTile
from model_compress.rpq.kernels.layout import pack_codes
from model_compress.rpq.kernels.packed.nibble_prompts import _nibble_prompt_kernel

SHAPES = [(4096, 11008), (11008, 4096)]
TILES = [PackedTile(128, 128, 64, num_warps=8, num_stages=3), PackedTile(128, 64, 64, num_warps=4, num_stages=3), PackedTile(128, 128, 64, num_warps=4, num_stages=3),
         PackedTile(128, 256, 64, num_warps=8, num_stages=3)]


@triton.jit
def _plain_kernel(x_ptr, w_ptr, out_ptr, tokens, out_features, in_features, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """out^T tile = W tile (registers, loaded) x x^T tile: the prompt kernel's arrangement without the lookup."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, in_features, BLOCK_K):
        offs_k = step + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * in_features + offs_k[None, :], mask=(offs_n < out_features)[:, None])
        x = tl.load(x_ptr + offs_m[:, None] * in_features + offs_k[None, :], mask=(offs_m < tokens)[:, None])
        acc = tl.dot(w, tl.trans(x), acc)
    tl.store(out_ptr + offs_m[None, :] * out_features + offs_n[:, None], acc.to(tl.float16),
             mask=(offs_n < out_features)[:, None] & (offs_m < tokens)[None, :])


def compiled_facts(kernel) -> dict:
    """Registers, spills, shared memory and the tensor-core instructions in the PTX of ``kernel``'s compiled variants."""
    facts = []
    for cache in kernel.device_caches.values():
        for compiled in cache[0].values():
            ptx = compiled.asm.get("ptx", "")
            facts.append({"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
                          "shared": getattr(compiled.metadata, "shared", None), "num_warps": getattr(compiled.metadata, "num_warps", None), "wgmma": ptx.count("wgmma.mma_async"),
                          "mma_sync": ptx.count("mma.sync"), "ldmatrix": ptx.count("ldmatrix"), "prmt": ptx.count("prmt.b32")})
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": []}
    for in_features, out_features in SHAPES:
        x = torch.randn(args.tokens, in_features, device="cuda", dtype=torch.float16)
        weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.float16) * 0.02 for _ in range(4)]
        codes = [(pack_codes(torch.randint(0, 16, (out_features, in_features), device="cuda"), 4),
                  torch.randint(-127, 128, (out_features, 16, 1), device="cuda", dtype=torch.int8),
                  torch.rand(out_features, device="cuda", dtype=torch.float16) / 64) for _ in range(8)]
        dense = graph_us([lambda w=w: F.linear(x, w) for w in weights])
        for tile in TILES:
            out = torch.empty(args.tokens, out_features, device="cuda", dtype=torch.float16)
            grid = (triton.cdiv(args.tokens, tile.block_m), triton.cdiv(out_features, tile.block_n))
            plain = graph_us([lambda w=w: _plain_kernel[grid](x, w, out, args.tokens, out_features, in_features, BLOCK_M=tile.block_m,
                                                                BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps,
                                                                num_stages=tile.num_stages) for w in weights])
            lookup = graph_us([lambda c=c: packed.nibble_prompt_linear(x, *c, None, 4, in_features, tile) for c in codes])
            row = {"shape": [in_features, out_features], "tile": tile.describe(), "cublas_us": dense, "plain_triton_us": plain,
                   "prompt_kernel_us": lookup}
            report["rows"].append(row)
            print(f"{in_features}->{out_features} t={args.tokens} {tile.describe()}: cuBLAS {dense:.1f} us, plain Triton tile "
                  f"{plain:.1f} us ({plain / dense:.2f}x), prompt kernel {lookup:.1f} us ({lookup / dense:.2f}x)", flush=True)
    report["plain_kernel"] = compiled_facts(_plain_kernel)
    report["prompt_kernel"] = compiled_facts(_nibble_prompt_kernel)
    for name in ("plain_kernel", "prompt_kernel"):
        for facts in report[name]:
            print(name, json.dumps(facts), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
