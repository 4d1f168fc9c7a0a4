"""Quality vs tree depth: `compress fff-distill` at several --depth, each checkpoint through `compress eval`.

Every step is the real CLI in a child process. The original is measured by the first eval (same
device, dtype, text, timing); later evals pass --no-baseline. Prints a Markdown table for
benchmarks/RESULTS.md with the fraction of FF neurons a token uses, the per-block held-out error,
the model's metric (perplexity, or embedding cosine to the original) and the FF blocks' prefill time.

    python benchmarks/fff/fff_curve.py MODEL --depths 2 3 4 5 6 --device cuda --out results/
"""

from __future__ import annotations

import sys

import argparse
import json
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))  # its sibling benchmark folder
from eval_curve import COMPRESS, run


def metric(quality: dict) -> str:
    if "perplexity" in quality:
        return f"ppl {quality['perplexity']:.2f}"
    if "mlm_perplexity" in quality:
        return f"MLM ppl {quality['mlm_perplexity']:.2f}"
    if "cosine_mean" in quality:
        return f"cosine {quality['cosine_mean']:.3f} (min {quality['cosine_min']:.3f})"
    return "-"


def ff_cells(latency: dict | None) -> list[str]:
    if not latency or latency.get("ff_prefill_ms") is None:
        return ["-", "-", "-"]
    return [f"{latency['prefill_ms']:.1f}", f"{latency['ff_prefill_ms']:.1f}", f"{100 * latency['ff_prefill_share']:.0f}%"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="what `compress fff-distill` takes; omit for the embedded default (MiniLM)")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="instead of --depths: one `compress fff-distill` argument string per checkpoint, "
                        "e.g. '--depth 3 --neurons-per-token 0.25' '--depth 2 --steps 0'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fff-curve"))
    parser.add_argument("--out", type=Path, default=Path("fff-curve"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fff-args", default="", help="extra `compress fff-distill` arguments, e.g. '--steps 200'")
    parser.add_argument("--eval-args", default="", help="extra `compress eval` arguments, e.g. '--max-tokens 65536'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    variants = args.variants or [f"--depth {depth}" for depth in args.depths]
    rows, first = [], None
    for number, variant in enumerate(variants):
        checkpoint = args.workdir / f"fff-v{number}"
        distill = [*COMPRESS, "fff-distill", *([args.model] if args.model else []), *variant.split(), "-o", str(checkpoint)]
        seconds = run([*distill, "--device", args.device, *args.fff_args.split(), "--force"])
        report_path = args.out / f"eval-v{number}.json"
        # embedding similarity is measured against the original, so encoders without a head keep it every time
        baseline = [] if first is None or first["metric"] == "embedding" else ["--no-baseline"]
        run([*COMPRESS, "eval", str(checkpoint), "--device", args.device, "--repeats", str(args.repeats), *baseline,
             *args.eval_args.split(), "--json", str(report_path), "--force"])
        report = json.loads(report_path.read_text())
        summary = json.loads((checkpoint / "compression_report.json").read_text())["summary"]
        (args.out / f"distill-v{number}.json").write_text(json.dumps(summary, indent=2))
        first = first or report
        blocks = summary["blocks"]
        busiest = sum(b["busiest_leaf"] for b in blocks) / len(blocks)
        e2e = summary["e2e"]
        rows.append([
            variant, f"{blocks[0].get('shared_width', 0)} + {2**blocks[0]['depth']} x {blocks[0]['leaf_width']}",
            f"{summary['neurons_per_token']:.1%}",
            f"{summary['init_error_mean']:.3f} -> {summary['error_mean']:.3f}", f"{busiest:.0%}",
            f"{e2e['before']:.3f} -> {e2e['after']:.3f}" if e2e.get("before") is not None else "-",
            metric(report["compressed"]["quality"]), *ff_cells(report["compressed"]["latency"]), f"{seconds:.0f}",
        ])

    header = ["fff-distill arguments", "shared + leaves x width", "neurons/token", "block error init -> trained", "busiest leaf (mean)",
              "e2e loss", "quality", "prefill ms", "FF ms in prefill", "FF share", "distill s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    original = first["original"]
    if original:
        lines.append("| " + " | ".join(["original", "dense", "100%", "-", "-", "-", metric(original["quality"]),
                                        *ff_cells(original["latency"]), "-"]) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = first["text"]
    print(f"\n{first['device']['name']}, {first['dtype']}, torch {first['versions']['torch']}, transformers "
          f"{first['versions']['transformers']}; {first['metric']} on {text['name']}: {text['tokens_used']:,} tokens\n")
    print("\n".join(lines))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
