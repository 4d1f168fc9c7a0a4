"""Does the Fisher estimate of what a layer costs the model predict the KL measured with that layer alone quantized?

    python benchmarks/rpq/sensitivity_check.py [MODEL] --blocks 0 5 10 15 20 25 29 --device cpu --out check.json

The allocation of `compress rpq --bits` compares layers by a predicted cost (rpq/fit/sensitivity.py): 1/2
sum_j F_jj r_j, with F_jj the Fisher diagonal of the model's next-token distribution in the layer's output
channel j and r_j the channel's mean squared output error. This script measures the real thing, as
exllamav3's allocation does: each Linear of the chosen blocks is fitted alone (the product's fit, in the
rotated basis, one format), swapped in, and the KL divergence of the model's next-token distribution from the
original's is measured on held-out windows of the calibration mix (never the eval text); then it is swapped
back. Two predictions are compared with it: the per-channel one above, and the isotropic one that takes the
error spread over the channels like the output (1/2 mean_j F_jj sum_j r_j). Prints the table, the rank
correlation (Spearman) and the spread of measured / predicted of each.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model_compress.core.sources import load_model, resolve_source
from model_compress.core.text import calibration_text
from model_compress.rpq.convert import find_layers, replace_layer
from model_compress.rpq.fit.calibration import calibration_set
from model_compress.rpq.fit.formats import CodeFormat
from model_compress.rpq.fit.groups import FitSettings, fit_rows_group
from model_compress.rpq.fit.layer import ROWS, FitProblem, decode_fit
from model_compress.rpq.fit.sensitivity import output_sensitivities
from model_compress.rpq.fit.stack import call_model, find_stack
from model_compress.rpq.fit.statistics import InputStatistics, recording_inputs
from model_compress.rpq.kernels.rotation import block_for, random_signs, rotate, rotate_hessian


def spearman(a: list[float], b: list[float]) -> float:
    ranks = lambda v: torch.tensor(v).argsort().argsort().double()  # noqa: E731
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def mean_kl(model, windows, reference: list[torch.Tensor], device) -> float:
    """Mean per-token KL(original || model) over ``windows``, against the original's log-probabilities."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window, log_p in zip(windows.split(1), reference):
            log_q = F.log_softmax(call_model(model, window.to(device)).logits.float(), dim=-1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += log_p.shape[0] * log_p.shape[1]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 29])
    parser.add_argument("--format", default="1,8,int8", help="D,K,codebook dtype of every fitted layer")
    parser.add_argument("--fit-windows", type=int, default=4)
    parser.add_argument("--kl-windows", type=int, default=2)
    parser.add_argument("--sensitivity-windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    piece, size, dtype = args.format.split(",")
    piece, size = int(piece), int(size)
    model, tokenizer = load_model(resolve_source(args.model), torch.float32)
    model.eval().to(device)
    total = args.fit_windows + args.kl_windows + args.sensitivity_windows
    windows = calibration_set(tokenizer, calibration_text(None), args.seq_len, total * args.seq_len, hold_out=False).fit
    fit_windows, sens_windows, kl_windows = windows.split([args.fit_windows, args.sensitivity_windows, args.kl_windows])
    names = [layer.name for layer in find_layers(model) if layer.kind in ("linear", "conv1d")]
    stack = find_stack(model, names)
    chosen = [n for n in names if stack.index_of(n) in set(args.blocks)]
    modules = {n: model.get_submodule(n) for n in chosen}
    start = time.perf_counter()
    sensitivity = output_sensitivities(model, modules, sens_windows.split(1), device)
    statistics = InputStatistics()
    with torch.no_grad(), recording_inputs(modules, statistics, device):
        for window in fit_windows.split(1):
            call_model(model, window.to(device))
            statistics.end_call()
    with torch.no_grad():
        reference = [F.log_softmax(call_model(model, w.to(device)).logits.float(), dim=-1) for w in kl_windows.split(1)]
    settings = FitSettings(rounds=1, float_dtype=torch.float16)
    rows = []
    for name in chosen:
        module = model.get_submodule(name)
        weight = module.weight.detach().float()
        width = weight.shape[1]
        block = block_for(width, 64)
        signs = random_signs(width, 0).to(device)
        hessian = rotate_hessian(statistics.moments[name].mean().to(device), signs, block)
        rotated = rotate(weight, signs, block)
        fmt = CodeFormat(weight.shape[0] // piece, size, dtype)
        fitted = fit_rows_group([rotated], [fmt], hessian, settings)[0]
        delta = rotated - decode_fit(FitProblem(rotated, ROWS), fitted.codes, fitted.codebooks)
        row_errors = ((delta @ hessian) * delta).sum(1).cpu()
        s = sensitivity[name]
        per_channel = 0.5 * float((s.fisher * row_errors).sum())
        isotropic = 0.5 * float(s.fisher.mean() * row_errors.sum())
        original = model.get_submodule(name)
        replace_layer(model, name, "linear", fmt, fitted, block, signs)
        measured = mean_kl(model, kl_windows, reference, device)
        model.set_submodule(name, original)
        rows.append({"layer": name, "output_error": fitted.output_error, "measured_kl": measured,
                     "predicted_per_channel": per_channel, "predicted_isotropic": isotropic})
        print(f"{name}: measured {measured:.5f}  per-channel {per_channel:.5f}  isotropic {isotropic:.5f}", flush=True)
    measured = [r["measured_kl"] for r in rows]
    summary = {}
    for key in ("predicted_per_channel", "predicted_isotropic"):
        predicted = [r[key] for r in rows]
        ratios = sorted(m / max(p, 1e-30) for m, p in zip(measured, predicted))
        logs = [math.log(r) for r in ratios]
        mean_log = sum(logs) / len(logs)
        summary[key] = {
            "spearman": spearman(predicted, measured),
            "ratio_median": ratios[len(ratios) // 2],
            "ratio_p10": ratios[len(ratios) // 10],
            "ratio_p90": ratios[(9 * len(ratios)) // 10],
            "log_ratio_std": (sum((x - mean_log) ** 2 for x in logs) / len(logs)) ** 0.5,
        }
    summary["output_error_spearman"] = spearman([r["output_error"] for r in rows], measured)
    print(f"\n| prediction | Spearman with measured KL | measured / predicted: median (p10-p90) | std of log ratio |")
    print("|---|---|---|---|")
    for key in ("predicted_per_channel", "predicted_isotropic"):
        v = summary[key]
        print(f"| {key.removeprefix('predicted_')} | {v['spearman']:.3f} | {v['ratio_median']:.2f} ({v['ratio_p10']:.2f}-{v['ratio_p90']:.2f}) | {v['log_ratio_std']:.2f} |")
    print(f"| relative output error alone (no weights) | {summary['output_error_spearman']:.3f} | - | - |")
    print(f"\n{len(rows)} layers, format D={piece} K={size} {dtype}, {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model or "default", "format": args.format, "rows": rows,
                                        "summary": summary, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
