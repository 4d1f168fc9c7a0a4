"""The certified PQ head index on a real model's head and real hidden states (CPU; torch reference of the search).

    python benchmarks/rpq/head_index_check.py [--model default|GGUF|FOLDER] [--piece 2] [--centroids 256] [--positions 512] [--json FILE]

Loads the model (the embedded SmolLM2-135M by default), takes the hidden states its head reads on the first windows
of the packaged Wikipedia sample (evaluation positions) and on the packaged calibration mix (the index's data-aware
clustering and the metric bound), builds the index (``--centroids`` per subspace, 256 by default; ``--piece`` values per code), and reports, over ``--positions``
evaluation positions: how often the approximate top-1 and top-k hold the dense argmax, the certified shortlist's size
(mean, largest), how often the whole head had to be computed (fallbacks), and that the certified token equals the dense
argmax at every position. Times are the torch reference's on this machine's CPU, beside the dense head's product.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model_compress.core.sources import default_source, load_model, resolve_source
from model_compress.core.text import calibration_text, default_text
from model_compress.rpq.head_index.index import build_index
from model_compress.rpq.head_index.search import certified_shortlists


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """What the LM head reads for each position of ``ids`` (1, T): (T, width)."""
    kept = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: kept.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return kept[0].reshape(-1, kept[0].shape[-1]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--piece", type=int, default=2, help="values per code (8-bit codes: 8 / piece bits per weight)")
    parser.add_argument("--centroids", type=int, default=256,
                        help="centroids per subspace (16: 4-bit codes, whose per-query tables fit a GPU's shared memory)")
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--first-rows", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    source = default_source() if args.model == "default" else resolve_source(args.model)
    model, tokenizer = load_model(source, torch.float32)
    model.eval()
    head = model.get_output_embeddings()
    weight = head.weight.detach().float()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().float()

    def tokens(text) -> torch.Tensor:
        return torch.tensor(tokenizer(text.joined[:200_000])["input_ids"][: args.window])[None]

    calib = final_hidden(model, tokens(calibration_text()))
    evaluation = final_hidden(model, tokens(default_text()))[: args.positions]
    start = time.perf_counter()
    index = build_index(weight, weight.shape[1] // args.piece, args.centroids, hidden_states=calib)
    build_s = time.perf_counter() - start
    dense = evaluation @ weight.T + (0 if bias is None else bias)
    truth = dense.argmax(dim=1)
    approx = index.approximate_scores(evaluation) + (0 if bias is None else bias)
    recall = {k: float((approx.topk(k, dim=1).indices == truth[:, None]).any(dim=1).float().mean()) for k in (1, 8, 64)}

    def exact(x, ids):
        out = weight[ids] @ x
        return out if bias is None else out + bias[ids]

    start = time.perf_counter()
    lists = certified_shortlists(evaluation, index, exact, bias, args.first_rows)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    for row in evaluation:
        (weight @ row).argmax()
    dense_s = time.perf_counter() - start
    sizes = [len(shortlist.rows) for shortlist in lists]
    result = {
        "model": args.model, "vocab": index.vocab, "centroids": args.centroids,
        "code_bits_per_weight": (args.centroids - 1).bit_length() / args.piece,
        "width": index.width, "subspaces": index.subspaces, "positions": len(lists),
        "certified_equals_dense": sum(shortlist.best == int(t) for shortlist, t in zip(lists, truth)),
        "fallbacks": sum(shortlist.fallback for shortlist in lists), "shortlist_mean": sum(sizes) / len(sizes),
        "shortlist_max": max(sizes), "shortlist_median": sorted(sizes)[len(sizes) // 2], "approx_recall_of_argmax": recall, "build_s": build_s,
        "search_ms_per_position_cpu": search_s / len(lists) * 1e3, "dense_ms_per_position_cpu": dense_s / len(lists) * 1e3,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
