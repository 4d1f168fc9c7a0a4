"""Where the device memory of graphed decoding goes, original vs RPQ: weights, derived data, everything else.

    python benchmarks/rpq/rpq_memory.py ORIGINAL COMPRESSED_FOLDER [--json FILE]

For each model, in a fresh allocator state: bytes allocated after loading (the weights), after a
512-token prefill (whatever the model keeps from it), after the first one-token step (the RPQ
layers' code bins), and the peak of a graphed batch-1 decode measured exactly as ``compress eval``
does it (``eval.graph_decode``). The issue's target: the RPQ peak is below the original's by at
least the weight savings, i.e. the RPQ model's memory beyond its weights is no larger than the
original's. The split shows which part of that overhead is RPQ's own (bins, kept split-K counters).
With ``MODEL_COMPRESS_RPQ_BINS=0`` the one-token calls read the codes (gather kernel) and no bins are made.
"""

from __future__ import annotations

import argparse
import json

import torch

import model_compress
from model_compress.eval.graph_decode import graphed_decode
from model_compress.eval.latency import release_device_memory
from model_compress.core.sources import load_model, resolve_source
from model_compress.rpq.kernels import triton as triton_kernels
from model_compress.rpq.layers.modules import RPQLinear
from model_compress.core.sizes import model_bytes

MB = 1e6


def allocated() -> float:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / MB


def bins_mb(model: torch.nn.Module) -> float:
    total = 0
    for module in model.modules():
        cached = module.__dict__.get("_code_bins") if isinstance(module, RPQLinear) else None
        if cached is not None:
            total += sum(t.numel() * t.element_size() for t in cached[1])
    return total / MB


def measure(model: torch.nn.Module, vocab: int) -> dict:
    figures = {"loaded_mb": allocated(), "weights_mb": model_bytes(model) / MB}  # as `compress eval` counts them
    with torch.inference_mode():
        model(input_ids=torch.randint(10, vocab, (1, 512), device="cuda"))
        figures["after_prefill_512_mb"] = allocated()
        model(input_ids=torch.randint(10, vocab, (1, 1), device="cuda"))
        figures["after_one_token_mb"] = allocated()
    figures["code_bins_mb"] = bins_mb(model)
    figures["kept_buffers_mb"] = triton_kernels.kept_bytes() / MB  # split-K counters
    prompt = torch.randint(10, vocab, (1, 32), device="cuda")
    graphed = graphed_decode(model, prompt, steps=128, repeats=2)
    figures["graph_decode_b1_peak_mb"] = (graphed.peak_memory or 0) / MB
    figures["graph_decode_b1_tokens_per_s"] = graphed.tokens_per_s
    figures["beyond_weights_mb"] = figures["graph_decode_b1_peak_mb"] - figures["weights_mb"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("original")
    parser.add_argument("compressed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {}
    for role in ("original", "compressed"):
        release_device_memory(torch.device("cuda"))  # as `compress eval` does between the two models
        torch.cuda.reset_peak_memory_stats()
        if role == "original":
            model = load_model(resolve_source(args.original), torch.float16)[0].to("cuda", torch.float16)
        else:
            model = model_compress.load(args.compressed, device="cuda", dtype=torch.float16)
        model.eval()
        result[role] = measure(model, min(1000, model.config.vocab_size))
        print(role, json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result[role].items()}))
        del model
    original, compressed = result["original"], result["compressed"]
    saving = original["graph_decode_b1_peak_mb"] - compressed["graph_decode_b1_peak_mb"]
    weight_saving = original["weights_mb"] - compressed["weights_mb"]
    result["peak_saving_mb"], result["weight_saving_mb"] = saving, weight_saving
    print(f"graphed decode b1 peak: saves {saving:.1f} MB; weights save {weight_saving:.1f} MB; "
          f"target {'met' if saving >= weight_saving else 'MISSED by %.1f MB' % (weight_saving - saving)}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
