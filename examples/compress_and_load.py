"""Compress a model with RPQ from Python, then load the checkpoint back and generate with it.

    python examples/compress_and_load.py MODEL OUT [--bits 4.5]

MODEL is a hub id, a local folder or a .gguf file. The checkpoint in OUT also loads with
``AutoModelForCausalLM.from_pretrained(OUT)`` once ``model_compress`` is imported.
"""

from __future__ import annotations

import argparse

import torch
import transformers

import model_compress
from model_compress.rpq.convert import RPQSettings
from model_compress.rpq.pipeline import compress_rpq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--bits", type=float, default=4.5, help="bits per weight, codebooks counted")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args()

    run = compress_rpq(args.model, args.out, RPQSettings(bits=args.bits), force=args.force)
    print(f"{run.summary.bits_per_weight:.3f} bits per weight, {run.summary.compressed_bytes / 1e6:.1f} MB of weights")

    model = model_compress.load(args.out)  # checks the folder first: a broken checkpoint is one clear error
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.out)
    prompt = tokenizer("The river rose for three days", return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    print(tokenizer.decode(tokens[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
