"""Use a compressed checkpoint as any transformers model: ``from_pretrained`` after ``import model_compress``.

    python examples/generate_with_transformers.py OUT "a prompt" [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model_compress  # noqa: F401 - registers the rpq and fff methods with transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prompt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
    print(tokenizer.decode(tokens[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
