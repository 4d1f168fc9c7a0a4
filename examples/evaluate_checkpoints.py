"""Evaluate two compressed checkpoints of the same original on the same text, side by side.

    python examples/evaluate_checkpoints.py OUT_A OUT_B [--text FILE] [--device cpu]

Each checkpoint is measured against the original it records (perplexity, or embedding similarity for
encoders without a head); latency is left out here (``compress eval`` measures it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model_compress.core.sources import parse_device
from model_compress.core.text import default_text, file_text
from model_compress.eval.compare import EvalSettings, evaluate
from model_compress.eval.report import rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs=2)
    parser.add_argument("--text", type=Path, default=None, help="UTF-8 text to measure on (default: the packaged Wikipedia sample)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args()

    text = file_text(args.text) if args.text else default_text()
    settings = EvalSettings(device=parse_device(args.device), seq_len=args.seq_len, latency=None)
    for checkpoint in args.checkpoints:
        result = evaluate(checkpoint, text, settings)
        print(f"{checkpoint} ({result.metric}):")
        for row in rows(result):
            if row.compressed is not None:
                ratio = f"{row.ratio:.3f}x" if row.ratio is not None else "-"
                print(f"  {row.name:<28} original {_number(row.original):>12}  compressed {_number(row.compressed):>12}  {ratio}")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    main()
