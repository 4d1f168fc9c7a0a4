"""Whole model on the GPU, original vs RPQ, through the product: `compress rpq`, then `compress eval`.

    python benchmarks/rpq/rpq_decode.py opt-1.3b --workdir /tmp/w --out DIR     # opt-1.3b architecture, random fp16
    python benchmarks/rpq/rpq_decode.py FILE.gguf --workdir /tmp/w --out DIR    # a real model (SmolLM2-135M)

`compress rpq SOURCE --codebooks 32 --device cuda --dtype float16`, then `compress eval` on the
folder (fp16, CUDA), whose JSON holds decode tokens/s at batch 1 and 16, eager (``generate``) and
replayed from a CUDA graph, prefill time, and peak memory of each, for both models. This script
reads that JSON and checks the targets: graphed decode at batch 1 >= 1.5x the original; peak memory
during it below the original's by at least the weight savings. ``--profile`` adds where the time of one
decode step goes (torch profiler, eager step, both models), with the linear layers' share: how much faster
a step could get if the layers took no time. ``--folder DIR`` profiles a folder made elsewhere (the
default's ``compress rpq -o DIR``) and stops.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from rpq_opt13b import OPT_1_3B, build
from timed_cli import run_timed_cli

TARGET_DECODE_RATIO = 1.5
# Kernels that compute a Linear layer: cuBLAS GEMV / GEMM by their names (nvjet: its Hopper kernels) and the RPQ layer kernels.
LINEAR_KERNELS = re.compile(r"gemv|gemm|xmma|cutlass|nvjet|_nibble|_packed_(linear|gemv|decode|head)|_binned|_gather", re.IGNORECASE)


def save_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE trained on the default text (random weights need some tokenizer for `eval`)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model_compress.core.text import default_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(default_text().documents, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>").save_pretrained(folder)


def source_for(model: str, workdir: Path, tokenizer: Path | None) -> str:
    """The model to compress; for opt-1.3b a random fp16 folder, with ``tokenizer``'s files when given."""
    if model != "opt-1.3b":
        return model
    folder = workdir / "opt-1.3b-random"
    if not (folder / "config.json").exists():
        build(folder, "cuda", OPT_1_3B)
        if tokenizer is not None:
            for file in tokenizer.glob("tokenizer*"):
                shutil.copy(file, folder / file.name)
        else:
            save_tokenizer(folder, 8192)
    return str(folder)


def summarize(report: dict) -> dict:
    """Ratios and target checks from an eval JSON."""
    original, compressed = report["original"], report["compressed"]
    lat_o, lat_c = original["latency"], compressed["latency"]
    figures = {
        "weights_mb": (original["weight_bytes"] / 1e6, compressed["weight_bytes"] / 1e6),
        "prefill_ms": (lat_o["prefill_ms"], lat_c["prefill_ms"]),
    }
    for kind in ("decode_tokens_per_s", "graph_decode_tokens_per_s"):
        for batch in lat_o[kind]:
            figures[f"{kind}_b{batch}"] = (lat_o[kind][batch], lat_c[kind].get(batch))
    for name, value in lat_o["peak_memory_bytes"].items():
        figures[f"peak_{name}_mb"] = (value / 1e6 if value else None, (lat_c["peak_memory_bytes"].get(name) or 0) / 1e6 or None)
    result = {"figures": figures, "graph_errors": {"original": lat_o.get("graph_decode_errors"), "compressed": lat_c.get("graph_decode_errors")}}
    graphed = figures.get("graph_decode_tokens_per_s_b1")
    if graphed and None not in graphed:
        result["graph_decode_b1_ratio"] = graphed[1] / graphed[0]
        result["graph_decode_b1_target_met"] = result["graph_decode_b1_ratio"] >= TARGET_DECODE_RATIO
    peak = figures.get("peak_graph_decode_batch_1_mb")
    if peak and None not in peak:
        savings = figures["weights_mb"][0] - figures["weights_mb"][1]
        result["peak_saving_mb"] = peak[0] - peak[1]
        result["weight_saving_mb"] = savings
        result["peak_target_met"] = peak[0] - peak[1] >= savings
    return result


def profile(source: str, folder: Path, out: Path, steps: int = 3, compiled: bool = False) -> None:
    """Top kernels of eager decode steps, original vs compressed (the graph replays the same kernels); ``compiled``:
    of the step under ``torch.compile`` in its default mode, whose kernels are those ``reduce-overhead`` replays."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import model_compress
    from model_compress.eval.graph_decode import DecodeStep
    from model_compress.core.sources import load_model, resolve_source

    lines = []
    for role in ("original", "compressed"):
        if role == "original":
            model, _ = load_model(resolve_source(source), torch.float16)
            model = model.to("cuda", torch.float16)
        else:
            model = model_compress.load(folder, device="cuda", dtype=torch.float16)
        model.eval()
        prompt = torch.randint(10, 1000, (1, 32), device="cuda")
        with torch.inference_mode():
            step = DecodeStep(model, prompt, 16)
            step.prefill()
            if compiled:
                torch._dynamo.reset()
                step.model = torch.compile(model, dynamic=False)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in events)
        launches = sum(e.count for e in events)
        linear = [e for e in events if LINEAR_KERNELS.search(e.key)]
        linear_time = sum(e.self_device_time_total for e in linear)
        lines.append(f"== {role}{' compiled' if compiled else ''}: {total / steps / 1e3:.3f} ms of kernels per decode step, "
                     f"{launches / steps:.0f} kernels per step")
        lines.append(
            f"  linear layers' kernels: {linear_time / total:.1%} of the kernel time, {sum(e.count for e in linear) / steps:.0f} "
            f"launches per step; with them at zero time a step would be {total / max(total - linear_time, 1e-9):.2f}x faster"
        )
        for event in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
            lines.append(
                f"  {event.self_device_time_total / total:6.1%} {event.self_device_time_total / steps:9.1f} us/step "
                f"x{event.count // steps:<4} {event.key[:90]}"
            )
        del model, step
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    (out / f"profile_{folder.name}{'_compiled' if compiled else ''}.txt").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="opt-1.3b (random weights) or a model path / .gguf")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rpq-decode"))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--name", default=None)
    parser.add_argument("--codebooks", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="profile the decode step under torch.compile")
    parser.add_argument("--folder", type=Path, default=None,
                        help="profile this converted folder against MODEL and stop (no conversion, no eval)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="opt-1.3b: copy tokenizer files from this folder (vocab <= 50272)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(args.model).stem
    source = source_for(args.model, args.workdir, args.tokenizer)
    if args.folder is not None:  # where a decode step's time goes, for a checkpoint made elsewhere (the default's)
        profile(source, args.folder, args.out, compiled=args.compiled)
        return
    folder = args.workdir / f"{name}-rpq{args.codebooks}"
    convert = run_timed_cli(
        "rpq", source, "-o", str(folder), "--codebooks", str(args.codebooks), "--device", "cuda", "--dtype", "float16", "--force"
    )
    print(f"compress rpq: {convert['wall_s']:.1f} s")
    report_path = args.out / f"eval_{name}.json"
    run_timed_cli(
        "eval", str(folder), "--device", "cuda", "--dtype", "float16", "--max-tokens", str(args.max_tokens),
        "--repeats", str(args.repeats), "--json", str(report_path), "--plot", str(args.out / f"eval_{name}.png"), "--force",
    )
    if not report_path.exists():
        raise SystemExit(f"compress eval wrote no report ({report_path}); run it by hand to see its error line")
    report = json.loads(report_path.read_text())
    summary = summarize(report)
    print(json.dumps(summary, indent=1))
    (args.out / f"summary_{name}.json").write_text(json.dumps(summary, indent=1))
    if args.profile:
        profile(source, folder, args.out, compiled=args.compiled)
    sys.exit(0)


if __name__ == "__main__":
    main()
