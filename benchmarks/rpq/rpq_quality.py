"""Quality of data-aware RPQ at several bit budgets, against the original and scalar baselines, in one run.

    python benchmarks/rpq/rpq_quality.py [MODEL] --budgets 4.5 3.25 2.5 --device cuda --out results.json [--baselines]

MODEL as `compress rpq` takes it (default: the embedded SmolLM2-135M). Every layer is converted,
embeddings and head included; perplexity is scored on the whole default evaluation text (the
packaged Wikipedia sample, windows of 2048 as `compress eval` cuts them, `--max-tokens` to cap),
calibration uses the packaged calibration mix (C4, technical, code, multilingual, tiny), never the evaluation text. An encoder without a head
(all-MiniLM-L6-v2) is scored by the cosine of its mean-pooled sentence embeddings to the original's.
For each budget: the conversion without fine-tuning (timed), its quality, then fine-tuning (timed)
and the quality after it. A budget here counts every weight of the model: the layers RPQ converts get
the `--bits` that leaves room for what stays dense (norms, biases, tiny tables, stored as they are),
and the table's bits per weight count every stored tensor of the whole model.

Baselines (benchmark code, not the product): per-group scalar quantization, asymmetric, groups of
128 along the input, 4 and 3 bits (4.25 / 3.25 bits per weight with a float16 scale and zero per
group), by round-to-nearest and by GPTQ (Frantar et al.; columns in order, 1% damping), on the same
layers, the same calibration windows and the same sequential scheme. Tables are round-to-nearest in
both (a lookup table has no input statistics) except a tied head, which GPTQ fits as the head.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from torch import nn

from model_compress.core.text import calibration_text, default_text
from model_compress.eval import similarity
from model_compress.eval.perplexity import causal_nll, cut_windows, tokenize
from model_compress.core.sources import load_model, resolve_source
from model_compress.rpq.convert import RPQSettings, convert_model, find_layers, plan_layers
from model_compress.rpq.fit.defaults import CALIBRATION_TOKENS, FINETUNE_STEPS
from model_compress.rpq.fit.calibration import calibration_set
from model_compress.rpq.fit.finetune import FinetuneSettings, Teacher, finetune
from model_compress.rpq.fit.hessian import prepare
from model_compress.rpq.fit.passes import Batches, run_pass
from model_compress.rpq.fit.stack import find_stack
from model_compress.core.sizes import model_bytes, model_params

GROUP = 128


def evaluate(model: nn.Module, data, device: torch.device, dtype: torch.dtype) -> dict:
    """Perplexity on the windows (causal LM) or pooled-embedding cosine to the original's (encoder).

    A copy is scored, so the model itself keeps its dtype (rounding the original to float16 and back
    would change what the next conversion starts from).
    """
    scored = copy.deepcopy(model).to(device, dtype)
    try:
        if data["kind"] == "perplexity":
            return {"perplexity": causal_nll(scored, data["windows"]).perplexity}
        outputs = similarity.embed(scored, data["batches"])
        if data.get("reference") is None:
            data["reference"] = outputs
        return similarity.compare(data["reference"], outputs)
    finally:
        del scored
        if device.type == "cuda":
            torch.cuda.empty_cache()


def converted_budget(model: nn.Module, budget: float, params: int) -> float:
    """The --bits for the converted layers that makes the whole model's stored bits ``budget`` per weight."""
    plans = plan_layers(find_layers(model), RPQSettings(bits=budget))
    layers = [p.layer for p in plans if p.converted and p.layer.kind != "tied_head"]
    converted = sum(l.numel for l in layers)
    dense_bits = 8 * model_bytes(model) - sum(8 * l.dense_bytes for l in layers)
    return (budget * params - dense_bits) / converted


def all_weight_bits(model: nn.Module, params: int) -> float:
    """Stored bits of every tensor of the model over the original's parameter count."""
    return 8 * model_bytes(model) / params


# -- baselines --------------------------------------------------------------------------------------

def group_grid(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and zero of each row over a group of columns (float16, as stored)."""
    low, high = weight.min(dim=1, keepdim=True).values, weight.max(dim=1, keepdim=True).values
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-8).half().float()
    zero = torch.round(-low / scale)
    return scale, zero


def round_to_grid(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.clamp(torch.round(weight / scale) + zero, 0, 2**bits - 1) - zero) * scale


def rtn(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest in groups of GROUP columns."""
    out = weight.clone().float()
    for start in range(0, weight.shape[1], GROUP):
        block = out[:, start : start + GROUP]
        out[:, start : start + GROUP] = round_to_grid(block, *group_grid(block, bits), bits)
    return out


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ with groups of GROUP columns (grid from the updated weights at each group's start)."""
    work = weight.clone().float()
    upper = prepare(hessian).inverse_factor
    columns = work.shape[1]
    quantized = torch.zeros_like(work)
    for start in range(0, columns, GROUP):
        stop = min(start + GROUP, columns)
        block = work[:, start:stop].clone()
        errors = torch.zeros_like(block)
        scale, zero = group_grid(block, bits)
        for i in range(stop - start):
            column = block[:, i]
            q = round_to_grid(column[:, None], scale, zero, bits)[:, 0]
            quantized[:, start + i] = q
            error = (column - q) / upper[start + i, start + i]
            block[:, i:] -= error[:, None] * upper[start + i, start + i : stop][None, :]
            errors[:, i] = error
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    return quantized


def baseline(model: nn.Module, method: str, bits: int, calibration, device: torch.device) -> nn.Module:
    """A copy of ``model`` with every Linear / Conv1D / embedding weight quantized by ``method`` in place."""
    model = copy.deepcopy(model)
    layers = find_layers(model)
    linears = {l.name: model.get_submodule(l.name) for l in layers if l.kind in ("linear", "conv1d", "tied_head")}
    with torch.no_grad():
        for layer in layers:
            if layer.kind == "embedding" and not any(l.tied_to == layer.name for l in layers):
                table = model.get_submodule(layer.name).weight
                table.copy_(rtn(table.to(device), bits).to(table.dtype).cpu())
        if method == "rtn":
            for name, module in linears.items():
                module.weight.copy_(_quantize_module(module, lambda w: rtn(w, bits), device))
            return model

        def fit(stage, index, statistics):
            for group in statistics.groups():
                hessian = statistics.hessian(group[0]).to(device)
                for name in group:
                    module = model.get_submodule(name)
                    module.weight.copy_(_quantize_module(module, lambda w: gptq(w, hessian, bits), device))
            return True

        windows = calibration.fit
        size = max(1, 8192 // windows.shape[1])
        batches = Batches([b for b in windows.split(size)], [])
        run_pass(model, find_stack(model, list(linears)), linears, batches, device, fit, sequential=True)
    return model


def _quantize_module(module: nn.Module, quantize, device: torch.device) -> torch.Tensor:
    """The module's weight quantized in RPQ terms (out, in): a Conv1D stores the transpose."""
    conv = type(module).__name__ == "Conv1D"
    weight = module.weight.detach().float().to(device)
    weight = weight.t() if conv else weight
    quantized = quantize(weight)
    return (quantized.t() if conv else quantized).to(module.weight.dtype).cpu()


# -- the run ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.5, 3.25, 2.5])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-dtype", default="float16", help="dtype both models are scored in on CUDA (CPU: float32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the eval text's first N tokens")
    parser.add_argument("--calib", type=Path, default=None, help="calibration text file (default: the packaged calibration mix)")
    parser.add_argument("--calib-tokens", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--finetune-lr", type=float, default=FinetuneSettings.lr)
    parser.add_argument("--baselines", action="store_true", help="also RTN and GPTQ at 4 and 3 bits, groups of 128")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    eval_dtype = getattr(torch, args.eval_dtype) if device.type == "cuda" else torch.float32
    kind = "cuda" if device.type == "cuda" else "cpu"

    started = time.perf_counter()
    source = resolve_source(args.model)
    original, tokenizer = load_model(source, torch.float32)
    params = model_params(original)
    print(f"loaded {source.label} ({params:,} parameters) in {time.perf_counter() - started:.0f} s", flush=True)
    text = default_text()
    causal = type(original.config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING and hasattr(original, "lm_head")
    if causal:
        windows = cut_windows(tokenize(tokenizer, text.joined), 2048, args.max_tokens)
        data = {"kind": "perplexity", "windows": windows}
    else:
        batches = similarity.sentence_batches(tokenizer, text.joined, 128, args.max_tokens or 65536, 64)
        data = {"kind": "embedding", "batches": batches, "reference": None}
    seq_len = min(2048, getattr(original.config, "max_position_embeddings", 2048))
    steps = FINETUNE_STEPS[kind] if args.finetune_steps is None else args.finetune_steps
    calibration = calibration_set(tokenizer, calibration_text(args.calib), seq_len, args.calib_tokens or CALIBRATION_TOKENS[kind], steps > 0)
    results = {
        "model": source.label, "device": torch.cuda.get_device_name() if kind == "cuda" else "cpu", "date": str(date.today()),
        "torch": torch.__version__, "transformers": transformers.__version__, "eval_dtype": str(eval_dtype),
        "text": text.name, "calibration": calibration.to_json(), "finetune_steps": steps, "runs": [],
    }
    if causal:
        results["eval_tokens"] = windows.numel()
    start = time.perf_counter()
    results["original"] = evaluate(original, data, device, eval_dtype)
    results["original"]["seconds"] = time.perf_counter() - start
    print("original", results["original"], flush=True)

    for budget in args.budgets:
        model = copy.deepcopy(original)
        teacher = Teacher()
        start = time.perf_counter()
        bits = converted_budget(model, budget, params)
        convert_model(model, RPQSettings(bits=bits, device=device), calibration, on_output=teacher.record)
        fit_seconds = time.perf_counter() - start
        run = {"method": "rpq", "budget": budget, "bits": bits, "bits_all_weights": all_weight_bits(model, params), "fit_seconds": fit_seconds}
        run["fitted"] = evaluate(model, data, device, eval_dtype)
        if steps:
            report = finetune(model, calibration.fit, calibration.held_out, teacher, FinetuneSettings(steps=steps, lr=args.finetune_lr), device)
            run["finetune"] = report.to_json()
            run["finetuned"] = evaluate(model, data, device, eval_dtype)
        run["seconds"] = time.perf_counter() - start
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        args.out.write_text(json.dumps(results, indent=2))
        del model, teacher

    if args.baselines:
        for method in ("rtn", "gptq"):
            for bits in (4, 3):
                start = time.perf_counter()
                model = baseline(original, method, bits, calibration, device)
                run = {"method": method, "bits": bits, "bits_all_weights": bits + 32 / GROUP, "fit_seconds": time.perf_counter() - start}
                run["fitted"] = evaluate(model, data, device, eval_dtype)
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                args.out.write_text(json.dumps(results, indent=2))
                del model
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    metric = "perplexity" if "perplexity" in results["original"] else "cosine_mean"
    reference = results["original"][metric]
    print(f"# {results['model']} on {results['text']}; {results['device']}; {results['date']}")
    print(f"| method | bits per weight (all weights) | {metric} | ratio to the original | after fine-tuning | ratio | fit s | fine-tune s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| original | 16 (as float16) | {reference:.4g} | 1 | | | | |")
    for run in results["runs"]:
        name = f"RPQ --bits {run['budget']:g}" if run["method"] == "rpq" else f"{run['method'].upper()} {run['bits']}-bit g{GROUP}"
        fitted = run["fitted"][metric]
        tuned = run.get("finetuned", {}).get(metric)
        ft_seconds = run.get("finetune", {}).get("seconds")
        print(
            f"| {name} | {run['bits_all_weights']:.3f} | {fitted:.4g} | {fitted / reference:.3f} | "
            f"{'' if tuned is None else f'{tuned:.4g}'} | {'' if tuned is None else f'{tuned / reference:.3f}'} | "
            f"{run['fit_seconds']:.0f} | {'' if ft_seconds is None else f'{ft_seconds:.0f}'} |"
        )


if __name__ == "__main__":
    main()
