"""Whole-model decode replayed from a CUDA graph, with the head answering from its index (fixed shortlists of
``module.FIXED_ROWS`` rows) against the same model with its own head, in one run on one GPU.

    python benchmarks/rpq/head_index_graphed.py FOLDER [--steps 64] [--repeats 3] [--json FILE]

FOLDER: a `compress rpq` output (its own head: an RPQ tied head, or a dense one). The index is built here, on the
hidden states of random token windows run through the model (speed is what is measured: on a random-weight model
the rate of positions left uncertified means nothing, and is reported as measured). Batch 1 and 16, 32-token prompts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import model_compress
from model_compress.eval.graph_decode import graphed_decode
from model_compress.rpq.head_index.attach import attach, calibrated_index, detach
from model_compress.rpq.head_index.module import FIXED_ROWS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = model_compress.load(args.folder, device="cuda", dtype=torch.float16).eval()
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    windows = torch.randint(10, vocab, (16, 256))
    start = time.perf_counter()
    certified = calibrated_index(model, windows, device)
    build_s = time.perf_counter() - start
    results = {"device": torch.cuda.get_device_name(), "folder": args.folder, "fixed_rows": FIXED_ROWS,
               "index": certified.describe(), "build_s": build_s, "rows": []}
    for batch in (1, 16):
        prompt = torch.randint(10, vocab, (batch, 32), device=device)
        index = detach(model)
        own = graphed_decode(model, prompt, args.steps, args.repeats)
        certified = attach(model, index, certified.first_rows)
        certified.fixed_rows = FIXED_ROWS
        indexed = graphed_decode(model, prompt, args.steps, args.repeats)
        positions, uncertified = certified.fixed_counts()
        certified.fixed_rows = None
        row = {"batch": batch, "own_head_tok_s": own.tokens_per_s, "indexed_tok_s": indexed.tokens_per_s,
               "ratio": None if not (own.tokens_per_s and indexed.tokens_per_s) else indexed.tokens_per_s / own.tokens_per_s,
               "positions": positions, "uncertified": uncertified, "errors": [own.error, indexed.error]}
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
