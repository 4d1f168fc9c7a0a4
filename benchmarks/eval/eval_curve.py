"""The quality / speed curve: `compress rpq` at several --codebooks, each checkpoint through `compress eval`.

Every step is the real CLI in a child process (what a user runs). The original is measured in the
first eval of the run (same device, dtype, text and timing); later evals pass --no-baseline unless
--baseline-every-time, and the table's original row comes from the first. Prints a Markdown table
for benchmarks/RESULTS.md; the eval JSON files (every figure and setting) go to --out.

    python benchmarks/eval/eval_curve.py MODEL --codebooks 32 96 288 --device cuda --out results/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MB = 1e6
COMPRESS = [sys.executable, "-m", "model_compress.cli.app"]  # the `compress` script, also where only PYTHONPATH finds the package


def run(command: list[str]) -> float:
    """Run a CLI command, echoing it; returns its wall time. Stops the benchmark on failure."""
    print("+ " + " ".join(command), flush=True)
    began = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if finished.returncode != 0:
        print(finished.stdout[-3000:], finished.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"failed ({finished.returncode}): {' '.join(command)}")
    print(finished.stdout[-6000:], flush=True)
    return seconds


def peak_mb(latency: dict | None, quality: dict) -> str:
    peaks = [quality.get("peak_memory_bytes")] + list((latency or {}).get("peak_memory_bytes", {}).values())
    peaks = [p for p in peaks if p is not None]
    return f"{max(peaks) / MB:.0f}" if peaks else "-"


def row(label: str, model: dict, seconds: str) -> str:
    quality, latency = model["quality"], model["latency"]
    decode = (latency or {}).get("decode_tokens_per_s", {})
    cells = [
        label,
        f"{model['bits_per_weight']:.2f}",
        f"{model['weight_bytes'] / MB:.0f}",
        f"{quality['perplexity']:.2f}" if "perplexity" in quality else "-",
        f"{latency['prefill_ms']:.1f}" if latency else "-",
        f"{decode['1']:.0f}" if "1" in decode else "-",
        f"{decode['16']:.0f}" if "16" in decode else "-",
        peak_mb(latency, quality),
        seconds,
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="what `compress rpq` takes; omit for the embedded default")
    parser.add_argument("--codebooks", type=int, nargs="+", default=[32, 96, 288])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/eval-curve"))
    parser.add_argument("--out", type=Path, default=Path("eval-curve"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-every-time", action="store_true")
    parser.add_argument("--rpq-args", default="", help="extra `compress rpq` arguments, e.g. '--dtype float16'")
    parser.add_argument("--eval-args", default="", help="extra `compress eval` arguments, e.g. '--max-tokens 4096'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    lines, reports, convert_seconds = [], {}, {}
    for index, codebooks in enumerate(args.codebooks):
        checkpoint = args.workdir / f"rpq-m{codebooks}"
        rpq = [*COMPRESS, "rpq", *([args.model] if args.model else []), "-m", str(codebooks), "-o", str(checkpoint)]
        convert_seconds[codebooks] = run([*rpq, "--device", args.device, *args.rpq_args.split(), "--force"])
        report = args.out / f"eval-m{codebooks}.json"
        baseline = [] if index == 0 or args.baseline_every_time else ["--no-baseline"]
        evaluate = [*COMPRESS, "eval", str(checkpoint), "--device", args.device, "--repeats", str(args.repeats)]
        run([*evaluate, *baseline, *args.eval_args.split(), "--json", str(report), "--force"])
        reports[codebooks] = json.loads(report.read_text())

    first = reports[args.codebooks[0]]
    header = "| model | bits/weight | weights MB | perplexity | prefill ms | decode tok/s b1 | decode tok/s b16 | peak MB | rpq s |"
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    if first["original"]:
        lines.append(row("original", first["original"], "-"))
    for codebooks, report in reports.items():
        lines.append(row(f"rpq M={codebooks}", report["compressed"], f"{convert_seconds[codebooks]:.0f}"))
    text, latency = first["text"], first["compressed"]["latency"]
    print(
        f"\n{first['device']['name']} ({first['device']['type']}), {first['dtype']}, torch {first['versions']['torch']}, "
        f"transformers {first['versions']['transformers']}; {first['metric']} on {text['name']}: "
        f"{text['tokens_used']:,} tokens in {text.get('windows')} windows of {text.get('seq_len')}; "
        f"prefill = {latency['prefill_tokens'] if latency else '-'} tokens at batch 1, "
        f"decode = {latency['decode_new_tokens'] if latency else '-'} new tokens (greedy, KV cache)\n"
    )
    print("\n".join(lines))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
