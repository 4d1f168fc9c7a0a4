"""Can a one-token RPQ Linear match the binned kernel without the code bins? Two bins-free forms, timed.

    python benchmarks/experiments/rpq_bins_free_probe.py

The binned kernel (``layout.code_bins``) is what makes one-token decoding fast, but its bins are the
device memory that SmolLM2-135M's peak-memory target has no room for (23.8 MB against a margin of
0). Both forms here read only the codes and codebooks, as the weights do:

* ``atomic``: programs over (codebook, input chunk) add x into an M x K histogram in global memory
  with ``tl.atomic_add`` (L2 reductions); the last program of each codebook (an arrival counter)
  multiplies the histogram by the codebook and puts both back to zero;
* ``onehot``: one program per codebook builds the histogram in registers, comparing every input's
  code with all K codes.

Same harness as ``rpq_kernels.py`` (CUDA graph over copies that overflow the L2), against the dense
layer, the routed binned kernel, the binned kernel without PDL and prefetch (the probes have neither)
and the one-token gather tile (the route without bins). Relative errors against the float32 reference.
Results: ``results/rpq_bins_free_probe_h100.log`` and RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dataclasses
import functools

import torch
import triton
import triton.language as tl
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rpq"))  # its sibling benchmark folder
from rpq_kernels import SHAPES, SMALL_SHAPES, Layers, graph_us

from model_compress.rpq.kernels import forward as kernels
from model_compress.rpq.kernels.config import routes as triton_dispatch
from model_compress.rpq.kernels import triton as tk


@triton.jit
def _atomic_hist_kernel(x_ptr, codes_ptr, codebooks_ptr, hist_ptr, counter_ptr, out_ptr, in_features, chunks,
                        K: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, CHUNK: tl.constexpr):
    h = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * CHUNK + tl.arange(0, CHUNK)
    mask = offs < in_features
    codes = tl.load(codes_ptr + h * in_features + offs, mask=mask, other=0).to(tl.int32)
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(hist_ptr + h * K + codes, xv, mask=mask, sem="relaxed")
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + h, 1, sem="acq_rel")
    if arrived == chunks - 1:
        ks = tl.arange(0, K)
        hist = tl.load(hist_ptr + h * K + ks, cache_modifier=".cg")
        tl.store(hist_ptr + h * K + ks, tl.zeros((K,), dtype=tl.float32))
        ds = tl.arange(0, DB)
        cb = tl.load(codebooks_ptr + h * K * D + ks[:, None] * D + ds[None, :], mask=(ds < D)[None, :], other=0.0).to(tl.float32)
        out = tl.sum(hist[:, None] * cb, axis=0)
        tl.store(out_ptr + h * D + ds, out.to(out_ptr.dtype.element_ty), mask=ds < D)
        tl.store(counter_ptr + h, 0)


@triton.jit
def _onehot_kernel(x_ptr, codes_ptr, codebooks_ptr, out_ptr, in_features, K: tl.constexpr, D: tl.constexpr, DB: tl.constexpr,
                   CHUNK: tl.constexpr):
    h = tl.program_id(0)
    ks = tl.arange(0, K)
    ds = tl.arange(0, DB)
    cb = tl.load(codebooks_ptr + h * K * D + ks[:, None] * D + ds[None, :], mask=(ds < D)[None, :], other=0.0)
    hist = tl.zeros((K,), dtype=tl.float32)
    for start in range(0, in_features, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < in_features
        codes = tl.load(codes_ptr + h * in_features + offs, mask=mask, other=0).to(tl.int32)
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        hist += tl.sum(tl.where(codes[:, None] == ks[None, :], xv[:, None], 0.0), axis=0)
    out = tl.sum(hist[:, None] * cb.to(tl.float32), axis=0)
    tl.store(out_ptr + h * D + ds, out.to(out_ptr.dtype.element_ty), mask=ds < D)

@functools.cache
def _scratch() -> tuple[torch.Tensor, torch.Tensor]:
    """The atomic form's histogram (up to 64 codebooks of 256 codes) and arrival counters: zero at rest, kept."""
    return torch.zeros(64 * 256, device="cuda", dtype=torch.float32), torch.zeros(64, device="cuda", dtype=torch.int32)


def atomic(x: torch.Tensor, cb: torch.Tensor, idx: torch.Tensor, chunk: int, warps: int) -> torch.Tensor:
    M, K, D = cb.shape
    fin = idx.shape[1]
    hist, counters = _scratch()
    out = torch.empty(1, M * D, device="cuda", dtype=x.dtype)
    chunks = triton.cdiv(fin, chunk)
    _atomic_hist_kernel[(M, chunks)](x, idx, cb, hist, counters, out, fin, chunks, K=K, D=D, DB=triton.next_power_of_2(D),
                                      CHUNK=chunk, num_warps=warps)
    return out


def onehot(x: torch.Tensor, cb: torch.Tensor, idx: torch.Tensor, chunk: int, warps: int) -> torch.Tensor:
    M, K, D = cb.shape
    out = torch.empty(1, M * D, device="cuda", dtype=x.dtype)
    _onehot_kernel[(M,)](x, idx, cb, out, idx.shape[1], K=K, D=D, DB=triton.next_power_of_2(D), CHUNK=chunk, num_warps=warps)
    return out


def measure(fin: int, fout: int) -> None:
    layers = Layers(fin, fout, 32, torch.float16)
    x = layers.input(1)
    copies = layers.rpq
    res = {"dense": layers.dense_us(1), "binned (route)": layers.rpq_us(1, None)}
    plain = dataclasses.replace(triton_dispatch.route(1, fin * fout).tile, pdl=False, prefetch=False)
    res["binned no pdl/prefetch"] = graph_us([lambda cb=cb, idx=idx: tk.linear_binned(x, cb, layers.bins[id(idx)], None, plain) for cb, idx in copies])
    gather = triton_dispatch.ONE_TOKEN_GATHER
    res["gather (no bins)"] = graph_us([lambda cb=cb, idx=idx: tk.linear_fused(x, cb, idx, None, gather) for cb, idx in copies])
    for chunk in (64, 128, 256):
        for warps in (1, 2, 4):
            res[f"atomic c{chunk} w{warps}"] = graph_us([lambda cb=cb, idx=idx, c=chunk, w=warps: atomic(x, cb, idx, c, w) for cb, idx in copies])
    for chunk in (16, 32, 64):
        for warps in (4, 8):
            res[f"onehot c{chunk} w{warps}"] = graph_us([lambda cb=cb, idx=idx, c=chunk, w=warps: onehot(x, cb, idx, c, w) for cb, idx in copies])
    cb, idx = copies[0]
    ref = kernels.linear_reference(x.float(), cb.float(), idx, None)
    errs = {n: ((f(x, cb, idx, c, w).float() - ref).norm() / ref.norm()).item() for n, f, c, w in
            [("atomic", atomic, 128, 2), ("atomic2", atomic, 64, 1), ("onehot", onehot, 32, 4)]}
    dense = res["dense"]
    print(f"== {fin}->{fout} copies {len(copies)} errs {errs}")
    for k, v in sorted(res.items(), key=lambda kv: kv[1]):
        print(f"  {k:28s} {v:7.2f} us  {v / dense:.3f}x dense", flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for fin, fout in SMALL_SHAPES + SHAPES:
        measure(fin, fout)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
