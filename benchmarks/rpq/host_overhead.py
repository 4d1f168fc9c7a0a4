"""Host time of one layer call in eager mode (what `generate` pays per layer when the GPU waits on Python), on CUDA.

    python benchmarks/rpq/host_overhead.py [--calls 2000] [--json FILE]

A small layer (SmolLM2-135M's 576->576, one token) takes a few microseconds of GPU time, so a loop of calls with no
synchronisation runs at the speed the host issues them: wall time per call is the host cost of that path. Rows,
from the bare launch up to the module: an empty ``torch.empty`` (the allocator), the dense ``F.linear`` (cuBLAS,
what the original pays), the byte-permute kernel launched through Triton's launcher (``packed.nibble_linear``),
the routed call (``packed_forward.linear``: checks, tile choice, launch) and its kept plan (route decided once, the
compiled kernel launched past the JIT), the norm + rotation prologue and its kept plan, and the ``RPQLinear`` module
behind a rotation (what a decoder layer's o_proj costs), routed per call and on its kept plans.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from rpq_7b_speed import rpq_like

from model_compress.rpq.kernels import packed, packed_forward
from model_compress.rpq.kernels.config.norm_spec import RMS_NORM
from model_compress.rpq.kernels.config.packed_routes import NIBBLE_ROUTES, packed_tile
from model_compress.rpq.kernels.layout import pack_codes
from model_compress.rpq.kernels.rotation import random_signs


def per_call_us(call, calls: int) -> float:
    """Median over 5 blocks of ``calls`` unsynchronised calls (after a warm-up), microseconds per call."""
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        blocks.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(blocks)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=576)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    width, device = args.features, "cuda"
    x = torch.randn(1, width, device=device, dtype=torch.float16)
    dense = torch.randn(width, width, device=device, dtype=torch.float16)
    codes = pack_codes(torch.randint(0, 16, (width, width), device=device), 4)
    books = torch.randint(-127, 128, (width, 16, 1), device=device, dtype=torch.int8)
    scales = torch.rand(width, device=device, dtype=torch.float16) / 64
    tile = packed_tile(1, NIBBLE_ROUTES)
    sms = packed_forward.multiprocessors(x.device)
    layer = rpq_like(torch.nn.Linear(width, width, bias=False, device=device, dtype=torch.float16), 16,
                     random_signs(width, 0).to(device))
    norm_weight = torch.ones(width, device=device, dtype=torch.float16)
    signs = layer.signs()
    layer.requires_grad_(False)
    kept_linear = packed_forward.linear_plan(x, codes, books, scales, None, 4, width)
    kept_prologue = packed.norm_rotate_plan(x, norm_weight, None, 1e-5, RMS_NORM, signs, 64)

    def per_call_module():  # grad on (nothing requires it): the module routes every call, keeps no plan
        with torch.enable_grad():
            return layer(x)

    rows = {
        "torch.empty": lambda: torch.empty(1, width, device=device, dtype=torch.float16),
        "dense F.linear (cuBLAS)": lambda: F.linear(x, dense),
        "byte-permute kernel via Triton's launcher": lambda: packed.nibble_linear(x, codes, books, scales, None, 4, width, tile, sms),
        "routed call (packed_forward.linear)": lambda: packed_forward.linear(x, codes, books, scales, None, 4, width),
        "kept plan of the routed call (direct launch)": lambda: kept_linear(x),
        "norm + rotation prologue": lambda: packed.norm_rotate(x, norm_weight, None, 1e-5, RMS_NORM, signs, 64),
        "kept plan of the prologue (direct launch)": lambda: kept_prologue(x, None),
        "RPQLinear module, rotated input, routed per call": per_call_module,
        "RPQLinear module, rotated input, kept plans": lambda: layer(x),
    }
    results = {}
    with torch.no_grad():
        for name, call in rows.items():
            results[name] = per_call_us(call, args.calls)
            print(f"{name:50s} {results[name]:7.2f} us per call", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "features": width,
                       "us_per_call": results}, handle, indent=1)


if __name__ == "__main__":
    main()
