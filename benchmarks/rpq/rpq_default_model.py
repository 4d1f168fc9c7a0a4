"""`compress rpq` on the embedded default model (SmolLM2-135M), for several --codebooks values.

    python benchmarks/rpq/rpq_default_model.py --codebooks 32 96 288 [--device cpu] [--iters 25]

Each conversion runs as its own `compress rpq` process (so its peak RSS is its own), then the
parent loads the original once and every compressed folder, and compares next-token logits on
one held-out paragraph: the relative logit error against the original, and the same for a
control that keeps the fitted codebooks but draws the codes at random. This is a smoke check
of quality, not the perplexity benchmark (that is `compress eval`, on a real corpus).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
from datetime import date
from pathlib import Path

import torch
from timed_cli import run_timed_cli

PARAGRAPH = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
    "Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel Tower "
    "surpassed the Washington Monument to become the tallest man-made structure in the world, a title it held for "
    "41 years until the Chrysler Building in New York City was finished in 1930."
)

def convert(codebooks: int, out: Path, device: str, iters: int) -> dict:
    return run_timed_cli(
        "rpq", "-o", str(out), "--codebooks", str(codebooks), "--device", device, "--iters", str(iters), "--force"
    )


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codebooks", type=int, nargs="+", default=[32, 96, 288])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=25)
    args = parser.parse_args()

    import transformers

    import model_compress
    from model_compress.core.checkpoint import REPORT_FILE
    from model_compress.core.sources import default_source, load_model

    transformers.utils.logging.set_verbosity_error()
    original, tokenizer = load_model(default_source())
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = original(ids, labels=ids)
    dense_mb = sum(p.numel() * p.element_size() for p in original.parameters()) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for codebooks in args.codebooks:
            out = Path(scratch) / f"m{codebooks}"
            run = convert(codebooks, out, args.device, args.iters)
            summary = json.loads((out / REPORT_FILE).read_text())["summary"]
            model = model_compress.load(out)
            with torch.no_grad():
                result = model(ids, labels=ids)
                gen = torch.Generator().manual_seed(0)
                for module in model.modules():
                    if hasattr(module, "indices") and hasattr(module, "codebook_size"):
                        module.indices.copy_(torch.randint(0, module.codebook_size, module.indices.shape, generator=gen))
                control = model(ids)
            errors = [layer["rel_error"] for layer in summary["layers"]]
            rows.append(
                {
                    "codebooks": codebooks,
                    "convert_s": run["wall_s"],
                    "fit_s": summary["seconds"],
                    "peak_rss_mb": run["peak_rss_mb"],
                    "dense_mb": dense_mb,
                    "size_mb": summary["compressed_bytes"] / 1e6,
                    "bpw": summary["bits_per_weight"],
                    "code_bpw": summary["code_bits_per_weight"],
                    "codebook_bpw": summary["codebook_bits_per_weight"],
                    "layer_error_mean": sum(errors) / len(errors),
                    "logit_error": relative(result.logits, reference.logits),
                    "random_code_logit_error": relative(control.logits, reference.logits),
                    "paragraph_ppl": result.loss.exp().item(),
                }
            )
    print(f"# compress rpq on SmolLM2-135M, k-means on {args.device}, --iters {args.iters}; {date.today()}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"original: {dense_mb:.1f} MB of weights, paragraph perplexity {reference.loss.exp().item():.2f}")
    print("| M | convert s (fit s) | peak RSS MB | size MB | bpw = codes + codebooks | layer rel. error (mean) "
          "| logit rel. error | same codebooks, random codes | paragraph ppl |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['codebooks']} | {r['convert_s']:.0f} ({r['fit_s']:.0f}) | {r['peak_rss_mb']:.0f} | {r['size_mb']:.1f} | "
            f"{r['bpw']:.2f} = {r['code_bpw']:.2f} + {r['codebook_bpw']:.2f} | {r['layer_error_mean']:.3f} | "
            f"{r['logit_error']:.3f} | {r['random_code_logit_error']:.3f} | {r['paragraph_ppl']:.1f} |"
        )
    print(f"parent peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
