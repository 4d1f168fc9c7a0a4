"""What the input rotation costs at run time on the torch path: x R alone, and an RPQ Linear with and without it.

    python benchmarks/rpq/rotation_cost.py --device cpu|cuda [--dtype float16]

SmolLM2-135M's shapes (576 -> 576, 576 -> 1536, 1536 -> 576) in the format the budget picks most (one 16-entry
int8 table per row, 4-bit codes), at 1 and 512 tokens: the layer's forward unrotated, rotated (blocks of 64),
and the rotation alone (one elementwise product and one batched 64 x 64 matrix product), each the median of
repeated calls (CUDA events on a GPU, after warm-up). The rotation of q/k/v (and gate/up) is computed once per
input and shared, so a block pays it four times (attention input, o_proj input, MLP input, down_proj input),
not seven.
"""

from __future__ import annotations

import argparse
import time

import torch

from model_compress.eval.latency import median_ms
from model_compress.rpq.kernels.rotation import block_for, random_signs, rotate
from model_compress.rpq.layers.modules import RPQLinear

SHAPES = ((576, 576), (576, 1536), (1536, 576))


def layer(in_features: int, out_features: int, block: int | None, device, dtype) -> RPQLinear:
    module = RPQLinear(in_features, out_features, out_features, 16, bias=False, codebook_dtype="int8", rotation_block=block, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.codebooks.copy_(torch.randint(-127, 128, module.codebooks.shape, generator=generator))
        module.codebook_scales.fill_(0.01)
        module.indices.copy_(torch.randint(0, 256, module.indices.shape, generator=generator, dtype=torch.uint8))
    if block:
        module.set_signs(random_signs(in_features, 0))
    return module.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on a CPU")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}, {dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; median of {args.repeats} calls")
    print("| shape in -> out | tokens | layer, unrotated (ms) | layer, rotated (ms) | rotation alone (ms) | rotated / unrotated |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for in_features, out_features in SHAPES:
            block = block_for(in_features, args.block)
            plain, rotated = (layer(in_features, out_features, b, device, dtype) for b in (None, block))
            signs = rotated.signs()
            for tokens in (1, 512):
                x = torch.randn(1, tokens, in_features, device=device, dtype=dtype)
                t_plain = median_ms(lambda: plain(x), device, 3, args.repeats)
                t_rotated = median_ms(lambda: rotated(x), device, 3, args.repeats)
                t_rotation = median_ms(lambda: rotate(x, signs, block), device, 3, args.repeats)
                print(f"| {in_features} -> {out_features} | {tokens} | {t_plain:.4f} | {t_rotated:.4f} | "
                      f"{t_rotation:.4f} | {t_rotated / t_plain:.3f} |", flush=True)


if __name__ == "__main__":
    main()
