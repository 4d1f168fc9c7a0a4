"""Distil a model's feed-forward blocks into Fast FeedForward trees on your own calibration text.

    python examples/distil_on_own_text.py MODEL TEXT_FILE OUT [--depth 3] [--steps 400]

Calibrate on text like what the model will see; report quality on other text (``compress eval``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model_compress.core.text import file_text
from model_compress.fff.distill import FFFSettings
from model_compress.fff.pipeline import distill_fff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("text", type=Path)
    parser.add_argument("out")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    settings = FFFSettings(depth=args.depth, steps=args.steps, calib_tokens=args.calib_tokens, seq_len=args.seq_len)
    run = distill_fff(args.model, args.out, settings, file_text(args.text, "TEXT_FILE"), force=args.force)
    for block in run.summary.blocks:
        print(f"{block.name}: relative error {block.init_error:.3f} -> {block.final_error:.3f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
