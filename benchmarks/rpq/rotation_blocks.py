"""Which rotation block to use: the relative output error of real layers fitted with and without the input rotation.

    python benchmarks/rpq/rotation_blocks.py [MODEL] --blocks 0 64 128 256 512 --layers 2 15 28 --device cpu

For a few blocks of a real model (default: the embedded SmolLM2-135M), the inputs of every Linear are recorded
on calibration windows of the packaged mix (the original model's states), then each layer (q/k/v stacked, as the
conversion fits them) is fitted in a few formats, once per rotation block (0: no rotation; a block larger than
the largest power of two dividing the width falls back to that one, as the conversion does). The figure is
tr(dW H dW^T) / tr(W H W^T) summed over the layers of a type, the objective the fit minimises, so formats
and blocks compare on the layers' own terms. Prints a Markdown table; ``--out`` keeps the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from model_compress.core.sources import load_model, resolve_source
from model_compress.core.text import calibration_text
from model_compress.rpq.convert import find_layers
from model_compress.rpq.fit.calibration import calibration_set
from model_compress.rpq.fit.formats import CodeFormat
from model_compress.rpq.fit.groups import FitSettings, fit_rows_group
from model_compress.rpq.fit.stack import call_model, find_stack
from model_compress.rpq.fit.statistics import InputStatistics, recording_inputs
from model_compress.rpq.kernels.rotation import block_for, random_signs, rotate, rotate_hessian

# (D, K, codebook dtype): one 16-entry table per row (about 4.3 bits), one 8-entry table (about 3.2), pairs of rows
FORMATS = ((1, 16, "int8"), (1, 8, "int8"), (2, 16, "int8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 64, 128, 256, 512])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28], help="block indices of the stack to fit")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer = load_model(resolve_source(args.model), torch.float32)
    model.eval()
    windows = calibration_set(tokenizer, calibration_text(None), args.seq_len, args.windows * args.seq_len, hold_out=False).fit
    names = [layer.name for layer in find_layers(model) if layer.kind in ("linear", "conv1d")]
    stack = find_stack(model, names)
    wanted = {i for i in args.layers if i < len(stack.blocks)}
    chosen = [n for n in names if stack.index_of(n) in wanted]
    statistics = InputStatistics()
    model.to(device)
    with torch.no_grad(), recording_inputs({n: model.get_submodule(n) for n in chosen}, statistics, device):
        for window in windows.split(1):
            call_model(model, window.to(device))
            statistics.end_call()
    settings = FitSettings(rounds=1, float_dtype=torch.float16)
    rows: dict[tuple[str, tuple, int], float] = {}
    for group in statistics.groups():
        hessian = statistics.moments[group[0]].mean().to(device)
        weights = [model.get_submodule(n).weight.detach().float().to(device) for n in group]
        width = weights[0].shape[1]
        for wanted_block in args.blocks:
            block = block_for(width, wanted_block) if wanted_block else None
            signs = random_signs(width, 0).to(device)
            h = rotate_hessian(hessian, signs, block) if block else hessian
            ws = [rotate(w, signs, block) for w in weights] if block else weights
            for piece, size, dtype in FORMATS:
                formats = [CodeFormat(w.shape[0] // piece, size, dtype) for w in ws]
                fitted = fit_rows_group(ws, formats, h, settings)
                for name, weight, layer in zip(group, ws, fitted):
                    kind = name.rsplit(".", 1)[-1]
                    energy = float(((weight @ h) * weight).sum())
                    key = (kind, (piece, size, dtype), wanted_block)
                    rows[key] = rows.get(key, 0.0) + layer.output_error * energy
                    rows[(kind, (piece, size, dtype), -wanted_block - 1)] = rows.get((kind, (piece, size, dtype), -wanted_block - 1), 0.0) + energy
    kinds = sorted({k for k, _, _ in rows})
    print(f"| layer | width | format | " + " | ".join(f"block {b}" if b else "no rotation" for b in args.blocks) + " |")
    print("|---|---|---|" + "---|" * len(args.blocks))
    table = []
    for kind in kinds:
        width = next(model.get_submodule(n).weight.shape[1] for n in chosen if n.endswith("." + kind))
        for fmt in FORMATS:
            errors = [rows[(kind, fmt, b)] / rows[(kind, fmt, -b - 1)] for b in args.blocks]
            table.append({"layer": kind, "width": width, "format": fmt, "errors": dict(zip(args.blocks, errors))})
            used = [block_for(width, b) if b else 0 for b in args.blocks]
            cells = [f"{e:.5f}" + ("" if not b or u == b else f" (={u})") for e, b, u in zip(errors, args.blocks, used)]
            print(f"| {kind} | {width} | D={fmt[0]} K={fmt[1]} {fmt[2]} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model or "default", "blocks": args.blocks, "layers": sorted(wanted),
                                        "rows": table, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
