"""`compress rpq` end to end on the facebook/opt-1.3b architecture (random fp16 weights).

    python benchmarks/rpq/rpq_opt13b.py --workdir /tmp/opt13b [--device cuda] [--codebooks 32 | --bits 4] [--tokenizer FILE.gguf]

The model is built from opt-1.3b's config numbers (hidden 2048, FF 8192, 24 layers, 32 heads,
vocab 50272, 2048 positions) with random weights, saved as a local folder (not timed), then
`compress rpq FOLDER -o OUT --codebooks 32 --device cuda --dtype float16` runs in a fresh
process and is timed whole: interpreter start, loading, fitting every layer, writing the folder.
With ``--bits`` the conversion is data-aware: it calibrates on the packaged calibration mix, which needs a
tokenizer in the folder; no OPT tokenizer ships offline, so ``--tokenizer`` copies one whose ids fit
the vocabulary (SmolLM2's, 49,152 ids, from its GGUF). Random weights make the errors meaningless:
this measures time and memory only.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from timed_cli import run_timed_cli

OPT_1_3B = dict(
    hidden_size=2048,
    ffn_dim=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    vocab_size=50272,
    max_position_embeddings=2048,
    word_embed_proj_dim=2048,
    do_layer_norm_before=True,
)


# --smoke: the same script on a tiny model, to check it on a CPU before spending GPU time.
SMOKE = dict(OPT_1_3B, hidden_size=64, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=300, word_embed_proj_dim=64)


def build(folder: Path, device: str, shape: dict) -> float:
    """Save a random fp16 model of ``shape`` to ``folder``; returns seconds taken."""
    start = time.perf_counter()
    config = transformers.OPTConfig(**shape, dtype="float16")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = transformers.OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--codebooks", type=int, default=None)
    parser.add_argument("--bits", type=float, default=None, help="a budget instead of fixed --codebooks")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a .gguf or folder whose tokenizer the model folder gets")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions, to test the script itself")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else OPT_1_3B
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / ("smoke-random-fp16" if args.smoke else "opt-1.3b-random-fp16")
    if not (source / "config.json").exists():
        print(f"built and saved the random model in {build(source, args.device, shape):.1f} s (not timed below)")
    if args.tokenizer is not None:
        gguf = {"gguf_file": args.tokenizer.name} if args.tokenizer.suffix == ".gguf" else {}
        folder = args.tokenizer.parent if gguf else args.tokenizer
        transformers.AutoTokenizer.from_pretrained(folder, **gguf).save_pretrained(source)
    setting = ["--bits", str(args.bits)] if args.bits is not None else ["--codebooks", str(args.codebooks or 32)]
    runs = []
    for _ in range(args.repeats):
        out = args.workdir / ("rpq-" + "-".join(setting).lstrip("-"))
        figures = run_timed_cli("rpq", str(source), "-o", str(out), *setting, "--device", args.device, "--dtype", "float16", "--force", echo=True)
        report = json.loads((out / "compression_report.json").read_text())["summary"]
        figures.update(
            fit_s=report["seconds"],
            size_mb=report["compressed_bytes"] / 1e6,
            dense_mb=report["original_bytes"] / 1e6,
            bpw=report["bits_per_weight"],
            layers=report["converted_layers"],
        )
        runs.append(figures)
        print(json.dumps(figures))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# opt-1.3b architecture, random fp16 weights, {' '.join(setting)}; {device_name}; {date.today()}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| run | end to end s | of which conversion s | peak GPU allocated MB | peak GPU reserved MB | peak RSS MB "
          "| size MB (dense) | bpw | layers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for index, r in enumerate(runs):
        print(
            f"| {index + 1} | {r['wall_s']:.1f} | {r['fit_s']:.1f} | {r.get('cuda_peak_allocated_mb', 0):.0f} | "
            f"{r.get('cuda_peak_reserved_mb', 0):.0f} | {r['peak_rss_mb']:.0f} | {r['size_mb']:.0f} ({r['dense_mb']:.0f}) | "
            f"{r['bpw']:.3f} | {r['layers']} |"
        )


if __name__ == "__main__":
    main()
