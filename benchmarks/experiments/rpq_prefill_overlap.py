"""Can the prompt path hide its weight decode? Ways of running decode + cuBLAS at 512 tokens, against the dense layer.

    python benchmarks/experiments/rpq_prefill_overlap.py [--json FILE] [--tokens 512]

The prompt route decodes W^T into a temporary, then calls cuBLAS (``triton_kernels.linear_decode``):
about 1.5x the dense layer on the opt-1.3b shapes, the decode's write of W^T being the difference.
The decode does not depend on the layer's input, so in a model it could run beside the previous
layer's GEMM. This measures, in the same CUDA graph of many weight copies as ``rpq_kernels.py``:

* ``serial``: the route as shipped;
* ``ahead``: copy i+1's W^T decoded on a side stream while copy i's GEMM runs (two buffers in flight),
  also with the GEMM on a high-priority stream, and with cuBLASLt told to leave SMs free for the
  decode (``torch._C._set_sm_carveout_experimental``);
* ``w_layout``: W (out, in) decoded instead of W^T, then ``F.linear`` exactly as the dense layer calls it;
* ``chunk_k`` / ``chunk_n``: W^T decoded a block of rows (or W a block of whole codebooks) at a time into
  one small reused buffer, so that the GEMM reads it back from L2.

Every variant is checked against ``linear_decode`` on the first copy (relative error printed). A
variant that gives nothing is still reported: these are the measurements behind RESULTS.md's "prompt
path" notes, not a route the layer takes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rpq"))  # its sibling benchmark folder
from rpq_kernels import SHAPES, Layers, graph_us

from model_compress.rpq.kernels import triton as triton_kernels


@triton.jit
def _decode_weight_kernel(codes_ptr, codebooks_ptr, out_ptr, out_features, columns, CODEBOOK_SIZE: tl.constexpr,
                          PIECE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """W[o, c] = codebooks[o // D, codes[o // D, c], o % D]: the dense layer's own (out, in) layout."""
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_o < out_features)[:, None] & (offs_c < columns)[None, :]
    heads = offs_o // PIECE
    pieces = offs_o - heads * PIECE
    codes = tl.load(codes_ptr + heads[:, None].to(tl.int64) * columns + offs_c[None, :], mask=mask, other=0).to(tl.int32)
    w = tl.load(codebooks_ptr + (heads[:, None] * CODEBOOK_SIZE + codes) * PIECE + pieces[:, None], mask=mask, other=0.0)
    tl.store(out_ptr + offs_o[:, None].to(tl.int64) * columns + offs_c[None, :], w, mask=mask)


def decode_weight(codebooks: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """W (out, in) of an RPQ Linear into ``out`` (the rows of whole codebooks that ``out`` holds)."""
    block_o, block_c = 64, 128
    grid = (triton.cdiv(indices.shape[1], block_c), triton.cdiv(out.shape[0], block_o))
    _decode_weight_kernel[grid](indices, codebooks, out, out.shape[0], indices.shape[1], CODEBOOK_SIZE=codebooks.shape[1],
                                PIECE=codebooks.shape[2], BLOCK_O=block_o, BLOCK_C=block_c)
    return out


def matmul(x: torch.Tensor, w: torch.Tensor, carveout: int) -> torch.Tensor:
    """x @ w, with cuBLASLt leaving ``carveout`` SMs free (0: as usual)."""
    if not carveout:
        return x @ w
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        return x @ w
    finally:
        torch._C._set_sm_carveout_experimental(None)


class DecodeAhead:
    """The next copy's W^T decoded on a side stream while this copy's GEMM runs."""

    def __init__(self, gemm_priority: int | None, carveout: int) -> None:
        self.side = torch.cuda.Stream()
        self.gemm_stream = torch.cuda.Stream(priority=gemm_priority) if gemm_priority is not None else None
        self.carveout = carveout
        self.pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def start(self, codebooks: torch.Tensor, indices: torch.Tensor) -> None:
        buffer = torch.empty(indices.shape[1], codebooks.shape[0] * codebooks.shape[2], device="cuda", dtype=codebooks.dtype)
        self.side.wait_stream(torch.cuda.current_stream())  # the buffer's last reader (two GEMMs back) is done
        with torch.cuda.stream(self.side):
            triton_kernels.decode_rows(codebooks, indices, buffer)
        done = torch.cuda.Event()
        done.record(self.side)
        self.pending = (buffer, done)

    def take(self) -> torch.Tensor:
        buffer, done = self.pending
        torch.cuda.current_stream().wait_event(done)
        return buffer

    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.gemm_stream is None:
            return matmul(x, w, self.carveout)
        main = torch.cuda.current_stream()
        self.gemm_stream.wait_stream(main)
        with torch.cuda.stream(self.gemm_stream):
            y = matmul(x, w, self.carveout)
        main.wait_stream(self.gemm_stream)
        return y

    def chain(self, x: torch.Tensor, copies: list) -> None:
        self.start(*copies[0])
        for i in range(len(copies)):
            w = self.take()
            if i + 1 < len(copies):
                self.start(*copies[i + 1])
            self.gemm(x, w)


def chunk_k(x: torch.Tensor, codebooks: torch.Tensor, indices: torch.Tensor, buffer: torch.Tensor, chunks: int) -> torch.Tensor:
    step = indices.shape[1] // chunks
    y = None
    for j in range(chunks):
        part = triton_kernels.decode_rows(codebooks, indices, buffer[:step], first_row=j * step)
        columns = x[:, j * step : (j + 1) * step]
        y = columns @ part if y is None else torch.addmm(y, columns, part)
    return y


def chunk_n(x: torch.Tensor, codebooks: torch.Tensor, indices: torch.Tensor, buffer: torch.Tensor, chunks: int) -> torch.Tensor:
    heads = codebooks.shape[0] // chunks
    step = heads * codebooks.shape[2]
    y = torch.empty(x.shape[0], codebooks.shape[0] * codebooks.shape[2], device="cuda", dtype=x.dtype)
    for j in range(chunks):
        part = decode_weight(codebooks[j * heads : (j + 1) * heads], indices[j * heads : (j + 1) * heads], buffer[:step])
        torch.mm(x, part.t(), out=y[:, j * step : (j + 1) * step])
    return y


def measure(in_features: int, out_features: int, tokens: int) -> dict:
    layers = Layers(in_features, out_features, 32, torch.float16)
    x = layers.input(tokens)
    copies = layers.rpq
    times = {"dense": layers.dense_us(tokens)}
    times["serial (the route)"] = graph_us([lambda c=c: triton_kernels.linear_decode(x, *c, None) for c in copies])
    times["decode W^T alone"] = graph_us([lambda c=c: triton_kernels.decode_weight_t(*c) for c in copies])
    whole = torch.empty(out_features, in_features, device="cuda", dtype=torch.float16)
    times["w_layout decode + F.linear"] = graph_us([lambda c=c: F.linear(x, decode_weight(*c, torch.empty_like(whole))) for c in copies])
    for gemm_priority, carveout in [(None, 0), (-1, 0), (None, 32)]:
        ahead = DecodeAhead(gemm_priority, carveout)
        name = f"ahead{'' if gemm_priority is None else ' gemm high priority'}{f' carveout {carveout}' if carveout else ''}"
        times[name] = graph_us([lambda ahead=ahead: ahead.chain(x, copies)]) / len(copies)
    for chunks in (2, 4):
        rows = torch.empty(in_features // chunks, out_features, device="cuda", dtype=torch.float16)
        times[f"chunk_k {chunks}"] = graph_us([lambda c=c, r=rows, n=chunks: chunk_k(x, *c, r, n) for c in copies])
        block = torch.empty(out_features // chunks, in_features, device="cuda", dtype=torch.float16)
        times[f"chunk_n {chunks}"] = graph_us([lambda c=c, b=block, n=chunks: chunk_n(x, *c, b, n) for c in copies])

    reference = triton_kernels.linear_decode(x, *copies[0], None).float()
    ahead = DecodeAhead(None, 32)
    ahead.start(*copies[0])
    checks = {
        "w_layout": F.linear(x, decode_weight(*copies[0], whole)),
        "ahead carveout": ahead.gemm(x, ahead.take()),
        "chunk_k 4": chunk_k(x, *copies[0], torch.empty(in_features // 4, out_features, device="cuda", dtype=torch.float16), 4),
        "chunk_n 4": chunk_n(x, *copies[0], torch.empty(out_features // 4, in_features, device="cuda", dtype=torch.float16), 4),
    }
    errors = {name: ((got.float() - reference).norm() / reference.norm()).item() for name, got in checks.items()}
    return {"shape": f"{in_features}->{out_features}", "copies": len(copies), "us": times,
            "ratio": {name: us / times["dense"] for name, us in times.items()}, "rel_error": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.tokens} tokens")
    results = []
    for in_features, out_features in SHAPES:
        result = measure(in_features, out_features, args.tokens)
        results.append(result)
        print(f"== {result['shape']} ({result['copies']} copies); rel. error vs the route: "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["rel_error"].items()))
        for name, us in result["us"].items():
            print(f"  {name:36s} {us:8.2f} us  {result['ratio'][name]:.3f}x dense", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens, "shapes": results},
                      handle, indent=1)


if __name__ == "__main__":
    main()
