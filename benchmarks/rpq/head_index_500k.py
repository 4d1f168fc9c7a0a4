"""The founding question's head, 500,000 x 4096 bfloat16, indexed and searched on the GPU: build time, how often the
certified token is the dense argmax (by the certificate: always), fallbacks, shortlist sizes, and the head's time per
call at batch 1 and 8 against the dense head (cuBLAS), fallbacks included.

    python benchmarks/rpq/head_index_500k.py [--vocab 500000] [--width 4096] [--positions 256] [--json FILE]

No real head of this size travels to the device, so the head is synthetic, built to score like a real one rather
than like noise (said here because the figures depend on it):

* rows: Gaussian vectors with a decaying spectrum (variance of direction i proportional to 1 / (1 + i)^0.5 in a random
  orthonormal basis) plus a shared direction that every row leans on a little (a real head's rows share a mean, the
  unigram direction), row norms spread log-normally (sigma 0.2);
* hidden states: what a context predicting a few tokens looks like: 3 rows drawn at random, mixed with weights 1,
  1/2 and 1/4 and scaled so that the first one's logit sits well above the crowd, plus anisotropic noise in the same
  basis (spectrum 1 / (1 + i)^0.3) and the shared direction;
* the top-1 / top-2 logit gap of the evaluated states is reported (median, 10th percentile), so a reader can compare
  it with a real model's.

Agreement is counted twice: with the argmax of float32 scores (what the certificate is about) and with that of the
dense head run in bfloat16 (what a bfloat16 model's greedy decoding picks). Both heads return bfloat16 logits, whose
rounding can tie two rows that float32 tells apart; the argmax then takes the first.

Calibration: 8,192 states drawn the same way (not the evaluated ones). The index uses 2 values per code (4 bits per
weight) by default (``--piece``). Device time per call: synchronised wall time of eager calls, median over the
positions, for the certified forward (``module.CertifiedForward``: scores, top-k, exact re-rank, widening, fallback)
and for ``x @ W.T`` in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model_compress.rpq.head_index.attach import attach
from model_compress.rpq.head_index.index import build_index

SHARED = 0.3  # how much every row leans on the shared direction, relative to its own part's scale


def synthetic_head(vocab: int, width: int, generator: torch.Generator, device: torch.device):
    """(rows (V, width) bfloat16, basis (width, width), shared direction (width,)), as the module docstring says."""
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, device=device))
    spectrum = (1.0 + torch.arange(width, device=device)) ** -0.25  # standard deviations
    spectrum = spectrum / spectrum.norm()
    shared = basis[:, 0]
    rows = torch.empty(vocab, width, device=device, dtype=torch.bfloat16)
    for start in range(0, vocab, 65536):
        count = min(65536, vocab - start)
        part = (torch.randn(count, width, generator=generator, device=device) * spectrum) @ basis.T
        part = part + SHARED * shared
        norms = torch.exp(0.2 * torch.randn(count, 1, generator=generator, device=device))
        rows[start:start + count] = (part / part.norm(dim=1, keepdim=True) * norms).bfloat16()
    return rows, basis, shared


def hidden_states(count: int, rows: torch.Tensor, basis: torch.Tensor, shared: torch.Tensor, generator: torch.Generator,
                  scale: float) -> torch.Tensor:
    """States predicting a few rows each (module docstring), (count, width) bfloat16."""
    vocab, width = rows.shape
    device = rows.device
    picks = torch.randint(0, vocab, (count, 3), generator=generator, device=device)
    mix = rows[picks].float() * torch.tensor([1.0, 0.5, 0.25], device=device)[None, :, None]
    noise_spectrum = (1.0 + torch.arange(width, device=device)) ** -0.15
    noise = (torch.randn(count, width, generator=generator, device=device) * noise_spectrum / noise_spectrum.norm()) @ basis.T
    states = scale * mix.sum(dim=1) + scale * 0.6 * noise - scale * 0.2 * shared
    return states.bfloat16()


def per_call_ms(call, positions: torch.Tensor, batch: int) -> list[float]:
    """Milliseconds of each call on ``batch`` positions at a time (after one warm-up call on the same ones)."""
    sync = torch.cuda.synchronize if positions.is_cuda else (lambda: None)
    times = []
    for start in range(0, positions.shape[0] - batch + 1, batch):
        x = positions[start:start + batch]
        call(x)
        sync()
        began = time.perf_counter()
        call(x)
        sync()
        times.append((time.perf_counter() - began) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=500_000)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--piece", type=int, default=2, help="values per 8-bit code")
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--scale", type=float, default=12.0, help="hidden states' scale (sets the logits' spread)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script at a small size")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    rows, basis, shared = synthetic_head(args.vocab, args.width, generator, device)
    calibration = hidden_states(8192, rows, basis, shared, generator, args.scale)
    evaluated = hidden_states(args.positions, rows, basis, shared, generator, args.scale)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    began = time.perf_counter()
    index = build_index(rows.float(), args.width // args.piece, 256, hidden_states=calibration.float(), value_dtype=torch.bfloat16)
    sync()
    build_s = time.perf_counter() - began
    head = torch.nn.Linear(args.width, args.vocab, bias=False, device=device, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        head.weight.copy_(rows)
    holder = torch.nn.Module()
    holder.lm_head = head
    holder.get_output_embeddings = lambda: head
    certified = attach(holder, index)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "vocab": args.vocab, "width": args.width, "piece": args.piece,
               "build_s": build_s, "index": certified.describe(), "rows": []}
    with torch.no_grad():
        dense = (evaluated.float() @ rows.float().T)
        top2 = dense.topk(2, dim=1).values
        gaps = (top2[:, 0] - top2[:, 1]).tolist()
        truth = dense.argmax(dim=1)
        del dense
        dense_head = (evaluated @ rows.T).argmax(dim=1)  # the dense head as a bfloat16 model runs it: its logits rounded
        results["dense_bf16_agrees_with_float32"] = float((dense_head == truth).float().mean())
        results["top1_top2_gap_median"] = statistics.median(gaps)
        results["top1_top2_gap_p10"] = sorted(gaps)[len(gaps) // 10]
        for batch in (1, 8):
            certified.positions = certified.fallbacks = 0
            agree = agree_bf16 = 0
            for start in range(0, args.positions - batch + 1, batch):
                chosen = certified(evaluated[start:start + batch]).float().argmax(dim=1)
                agree += int((chosen == truth[start:start + batch]).sum())
                agree_bf16 += int((chosen == dense_head[start:start + batch]).sum())
            answered = certified.positions
            index_ms = per_call_ms(certified, evaluated, batch)
            dense_ms = per_call_ms(lambda x: x @ rows.T, evaluated, batch)
            row = {"batch": batch, "positions": answered, "agreement": agree / answered, "agreement_with_bf16_head": agree_bf16 / answered,
                   "fallback_rate": certified.fallbacks / answered,
                   "index_ms": statistics.median(index_ms), "index_ms_mean": statistics.mean(index_ms),
                   "dense_ms": statistics.median(dense_ms)}
            row["ratio_median"] = row["index_ms"] / row["dense_ms"]
            row["ratio_mean"] = row["index_ms_mean"] / statistics.mean(dense_ms)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
