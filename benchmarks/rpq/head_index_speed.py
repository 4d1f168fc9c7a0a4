"""What the head index's parts cost on the GPU against the dense head (cuBLAS), for a 500,000 x 4096 bfloat16 head and
SmolLM2's 49,152 x 576 one, at 1 and 8 tokens: the approximate scores (one kernel over the codes: 8-bit codes of 2 or 4
values, that is 4 or 2 bits per weight), the error bounds and the top-k of the upper bounds, and the exact logits of
a shortlist of k rows; and the path the search takes, the bounds added in the scoring kernel's epilogue, then the
top-k. Speed only: random codes and rows (what the certificate accepts on a real head, and so how
many rows it re-ranks, is measured by ``head_index_check.py``). Device time of each part in a CUDA graph, median of 3
(``rpq_kernels.graph_us``), the dense head over two copies so that its weight does not sit in the L2.

    python benchmarks/rpq/head_index_speed.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
from rpq_kernels import graph_us

from model_compress.rpq.head_index.index import PQHeadIndex

SHAPES = {"500k x 4096": (500_000, 4096), "SmolLM2-135M": (49152, 576)}
PIECES = (2, 4)  # values per code: 4 and 2 bits per weight with 256 centroids
TOKENS = (1, 8)
SHORTLISTS = (256, 1024, 4096)


def random_index(vocab: int, width: int, piece: int) -> PQHeadIndex:
    books = width // piece
    return PQHeadIndex(torch.randn(books, 256, piece, device="cuda", dtype=torch.bfloat16) / width**0.5,
                       torch.randint(0, 256, (books, vocab), device="cuda", dtype=torch.uint8),
                       torch.rand(vocab, device="cuda") * 0.1, 1.0, torch.rand(vocab, device="cuda") * 0.1,
                       torch.eye(width, device="cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "rows": []}
    for name, (vocab, width) in SHAPES.items():
        results["rows"] += measure(name, vocab, width)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


def measure(name: str, vocab: int, width: int) -> list[dict]:
    """Every part at every token count for one head shape."""
    rows = []
    heads = [torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    for tokens in TOKENS:
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        dense = graph_us([lambda w=w: x @ w.T for w in heads])
        row = {"head": name, "tokens": tokens, "dense_us": dense}
        for piece in PIECES:
            index = random_index(vocab, width, piece)
            scores = index.approximate_scores(x)
            row[f"scores_{piece}_us"] = graph_us([lambda: index.approximate_scores(x)])
            row[f"bounds_topk_{piece}_us"] = graph_us([lambda: (scores + index.error_bounds(x)).topk(1025, dim=1)])
            # what the search runs: the bounds added in the scoring kernel's epilogue, then the top-k
            row[f"upper_topk_{piece}_us"] = graph_us([lambda: index.upper_bounds(x).topk(1025, dim=1)])
        for k in SHORTLISTS:
            ids = torch.randint(0, vocab, (tokens, k), device="cuda")
            row[f"exact_{k}_us"] = graph_us([lambda: torch.einsum("bkd,bd->bk", heads[0][ids].float(), x.float())])
        row["ratio_4bit_k1024"] = (row["upper_topk_2_us"] + row["exact_1024_us"]) / dense
        row["ratio_2bit_k1024"] = (row["upper_topk_4_us"] + row["exact_1024_us"]) / dense
        print(json.dumps(row))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
