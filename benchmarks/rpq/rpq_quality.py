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
both (a lookup table has no input statistics) except a tied head, which GPTQ fits as the head. With
``--baseline-rotation hadamard`` they quantize W R (against R^T H R) with the rotation RPQ uses, each
layer then holding Q(W R) R^T, so the comparison with a rotated RPQ is fair.

``--finetune-variants 400:1e-4 800:2e-4`` fine-tunes a copy of each budget's conversion once per
STEPS:LR pair (one conversion, one teacher), to choose the fine-tuning defaults.
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
from model_compress.rpq.kernels.rotation import block_for, random_signs, rotate, rotate_hessian, unrotate
from model_compress.rpq.fit.defaults import DEFAULT_ROTATION_BLOCK
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


def rotated(quantize, width: int, rotation_block: int | None, device: torch.device):
    """``quantize`` applied to W R and the result turned back (Q(W R) R^T), or ``quantize`` itself unrotated."""
    block = block_for(width, rotation_block) if rotation_block else None
    if block is None:
        return quantize, lambda h: h
    signs = random_signs(width, 0).to(device)
    return (lambda w: unrotate(quantize(rotate(w, signs, block)), signs, block)), (lambda h: rotate_hessian(h, signs, block))


def baseline(model: nn.Module, method: str, bits: int, calibration, device: torch.device, rotation_block: int | None = None) -> nn.Module:
    """A copy of ``model`` with every Linear / Conv1D / embedding weight quantized by ``method`` in place, in the
    rotated basis where ``rotation_block`` is given."""
    model = copy.deepcopy(model)
    layers = find_layers(model)
    linears = {l.name: model.get_submodule(l.name) for l in layers if l.kind in ("linear", "conv1d", "tied_head")}
    with torch.no_grad():
        for layer in layers:
            if layer.kind == "embedding" and not any(l.tied_to == layer.name for l in layers):
                table = model.get_submodule(layer.name).weight
                quantize, _ = rotated(lambda w: rtn(w, bits), table.shape[1], rotation_block, device)
                table.copy_(quantize(table.to(device).float()).to(table.dtype).cpu())
        if method == "rtn":
            for name, module in linears.items():
                width = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]
                quantize, _ = rotated(lambda w: rtn(w, bits), width, rotation_block, device)
                module.weight.copy_(_quantize_module(module, quantize, device))
            return model

        def fit(stage, index, statistics):
            for group in statistics.groups():
                hessian = statistics.hessian(group[0]).to(device)
                _, rotate_h = rotated(None, hessian.shape[0], rotation_block, device)
                h = rotate_h(hessian)
                quantize, _ = rotated(lambda w: gptq(w, h, bits), hessian.shape[0], rotation_block, device)
                for name in group:
                    module = model.get_submodule(name)
                    module.weight.copy_(_quantize_module(module, quantize, device))
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
    parser.add_argument("--rotation", choices=("hadamard", "none"), default=None, help="RPQ's --rotation (default: the product's)")
    parser.add_argument("--rotation-block", type=int, default=None, help="RPQ's --rotation-block (default: the product's)")
    parser.add_argument("--baseline-rotation", choices=("hadamard", "none"), nargs="+", default=["none"],
                        help="run the baselines unrotated, rotated (the product's default block), or both")
    parser.add_argument("--finetune-variants", nargs="+", default=None, metavar="STEPS:LR",
                        help="fine-tune a copy of each conversion once per pair, instead of once at --finetune-steps/--finetune-lr")
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

    variants = [tuple(v.split(":")) for v in args.finetune_variants] if args.finetune_variants else [(steps, args.finetune_lr)]
    variants = [(int(s), float(lr)) for s, lr in variants]
    for budget in args.budgets:
        model = copy.deepcopy(original)
        teacher = Teacher()
        start = time.perf_counter()
        bits = converted_budget(model, budget, params)
        settings = RPQSettings(bits=bits, device=device, rotation=args.rotation, rotation_block=args.rotation_block)
        conversion = convert_model(model, settings, calibration, on_output=teacher.record)
        fit_seconds = time.perf_counter() - start
        run = {"method": "rpq", "budget": budget, "bits": bits, "bits_all_weights": all_weight_bits(model, params), "fit_seconds": fit_seconds,
               "rotation": settings.rotation_kind, "rotation_block": settings.wanted_block,
               "bits_converted": sum(o.plan.code_bytes + o.plan.codebook_bytes for o in conversion.outcomes if hasattr(o, "plan")) * 8
               / max(1, sum(o.plan.layer.numel for o in conversion.outcomes if hasattr(o, "plan") and o.plan.layer.kind != "tied_head"))}
        run["fitted"] = evaluate(model, data, device, eval_dtype)
        print(json.dumps(run), flush=True)
        tuned_runs = [(n, lr) for n, lr in variants if n]
        for variant_steps, lr in tuned_runs:
            tuned = copy.deepcopy(model)
            report = finetune(tuned, calibration.fit, calibration.held_out, teacher, FinetuneSettings(steps=variant_steps, lr=lr), device)
            entry = {**run, "finetune": report.to_json(), "finetuned": evaluate(tuned, data, device, eval_dtype)}
            entry["seconds"] = time.perf_counter() - start
            results["runs"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "finetune"} | {"steps": variant_steps, "lr": lr,
                              "held_out_kl": [report.held_out_kl_before, report.held_out_kl_after]}), flush=True)
            del tuned
        if not tuned_runs:
            results["runs"].append({**run, "seconds": time.perf_counter() - start})
        args.out.write_text(json.dumps(results, indent=2))
        del model, teacher

    if args.baselines:
        for rotation in args.baseline_rotation:
            block = (args.rotation_block or DEFAULT_ROTATION_BLOCK) if rotation == "hadamard" else None
            for method in ("rtn", "gptq"):
                for bits in (4, 3):
                    start = time.perf_counter()
                    model = baseline(original, method, bits, calibration, device, block)
                    run = {"method": method, "bits": bits, "rotation": rotation, "bits_all_weights": bits + 32 / GROUP,
                           "fit_seconds": time.perf_counter() - start}
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
        if run["method"] == "rpq":
            name = f"RPQ --bits {run['budget']:g}" + ("" if run.get("rotation", "none") == "hadamard" else " --rotation none")
            if "finetune" in run:
                name += f" (fine-tuning {run['finetune']['steps']} steps, lr {run['finetune']['lr']:g})"
        else:
            name = f"{run['method'].upper()} {run['bits']}-bit g{GROUP}" + (" rotated" if run.get("rotation") == "hadamard" else "")
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
