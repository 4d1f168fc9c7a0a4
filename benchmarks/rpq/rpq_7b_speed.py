"""Whole-model speed of a 7B-class architecture on the GPU: the dense fp16 original, torch's int4 weight-only matmul,
and RPQ layers in the budget's formats, each decoding from a CUDA graph at batch 1 and 16, and a 512-token prefill.

    python benchmarks/rpq/rpq_7b_speed.py [--layers 32] [--codebook-size 16] [--programmatic-launch] [--json FILE]
    python benchmarks/rpq/rpq_7b_speed.py --architecture smollm2-135m --programmatic-launch   # SmolLM2-135M's shapes, 30 blocks
    python benchmarks/rpq/rpq_7b_speed.py --smoke        # a tiny config on the CPU: builds and runs each variant once

Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with random weights built on the device:
speed only, so the RPQ layers get random codes instead of a fitted conversion (a 7B conversion does not fit one
device call yet). Every Linear of the decoder and the untied head becomes one ``--codebook-size`` table per
output row with int8 values (16: 4-bit codes, what the default budget picks most), rotated in blocks of 64 with
the fusions a loaded checkpoint gets (the pre-norm writes x R, the SiLU gate too); the embedding stays dense
(a lookup). The int4 baseline (``_weight_int4pack_mm``, groups of 128) runs in bfloat16, which it needs.
Graphed decode: ``model_compress.eval.graph_decode``, 32 steps, median of 3 blocks. RPQ prefill is also timed with the
``fused_prompts`` option off (W' decoded for cuBLAS), the prompt route the tensor-core prompt kernel replaced. Prefill is timed eager (wall time of
``model(prompt)``, which a slow host stretches) and, at 512 and 2,048 tokens, replayed from a CUDA graph (device time).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import transformers
from torch import nn

from model_compress.eval.graph_decode import graphed_decode
from model_compress.eval.graph_prefill import graphed_forward_ms
from model_compress.rpq.fusions import apply_fusions
from model_compress.rpq.kernels.config import options
from model_compress.rpq.kernels.layout import code_bits, pack_codes
from model_compress.rpq.kernels.rotation import random_signs
from model_compress.rpq.layers.modules import RPQLinear

LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, num_hidden_layers=30)
ARCHITECTURES = {"llama-2-7b": LLAMA_2_7B, "smollm2-135m": SMOLLM2_135M}
SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
             max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
PREFILL_GRAPHED = (512, 2048)  # prompt lengths whose prefill is also timed as device time (a CUDA graph)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(layers: int | None, smoke: bool, device: str, architecture: str = "llama-2-7b") -> nn.Module:
    """Random fp16 (fp32 on the CPU) weights, drawn on the device; ``layers`` None keeps the architecture's count."""
    shapes = dict(SMOKE if smoke else ARCHITECTURES[architecture])
    shapes.setdefault("num_hidden_layers", 32)
    if layers is not None:
        shapes["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(**shapes)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device=device).to(torch.float32 if smoke else torch.float16).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02) if parameter.dim() > 1 else parameter.fill_(1.0)
    # the rotary frequencies are a buffer the meta build left empty: a fresh module computes them (float32, as HF keeps them)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    return model


class Int4Linear(nn.Module):
    """torch's int4 weight-only matmul, groups of 128, bfloat16: random nibbles and scales (speed only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        nibbles = torch.randint(0, 16, (out_features, in_features), device=linear.weight.device, dtype=torch.int32)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack((nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(torch.uint8), 8))
        self.register_buffer("scales", torch.rand(in_features // 128, out_features, 2, device=linear.weight.device, dtype=torch.bfloat16) / 64)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return torch.ops.aten._weight_int4pack_mm(rows, self.weight, 128, self.scales).reshape(*x.shape[:-1], self.out_features)


def rpq_like(linear: nn.Module, size: int, signs: torch.Tensor) -> RPQLinear:
    """An RPQ Linear of ``linear``'s shape: one ``size``-entry int8 table per output row, random codes, rotated by ``signs``."""
    out_features, in_features = linear.out_features, linear.in_features
    device, dtype = signs.device, torch.float16 if signs.device.type == "cuda" else torch.float32
    layer = RPQLinear(in_features, out_features, out_features, size, bias=False, device=device, dtype=dtype,
                      codebook_dtype="int8", rotation_block=64)
    with torch.no_grad():
        layer.codebooks.copy_(torch.randint(-127, 128, layer.codebooks.shape, device=device, dtype=torch.int8))
        layer.codebook_scales.copy_(torch.rand(out_features, device=device, dtype=dtype) / 64)
        layer.indices.copy_(pack_codes(torch.randint(0, size, (out_features, in_features), device=device), code_bits(size)))
    layer.set_signs(signs)
    return layer


def replace_linears(model: nn.Module, make) -> None:
    """Every decoder projection and the head through ``make(linear, group)``; group names the input it reads."""
    for index, layer in enumerate(model.model.layers):
        for parent, names in ((layer.self_attn, LINEAR_NAMES[:4]), (layer.mlp, LINEAR_NAMES[4:])):
            for name in names:
                group = f"{index}.{'qkv' if name in LINEAR_NAMES[:3] else 'gateup' if name in LINEAR_NAMES[4:6] else name}"
                setattr(parent, name, make(getattr(parent, name), group))
    model.lm_head = make(model.lm_head, "head")


def prefill_ms(model: nn.Module, tokens: int, vocab: int, device: str) -> float:
    prompt = torch.randint(0, vocab, (1, tokens), device=device)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(prompt)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def graphed_prefill_ms(model: nn.Module, tokens: int, vocab: int, device: str) -> float:
    """Device time of one prefill (no cache) replayed from a CUDA graph, as ``compress eval`` times it: what the GPU
    spends, whatever the host's speed."""
    prompt = torch.randint(0, vocab, (1, tokens), device=device)
    milliseconds, error = graphed_forward_ms(lambda: model(prompt, use_cache=False), torch.device(device), 5)
    torch.cuda.empty_cache()
    if error is not None:
        raise RuntimeError(f"prefill of {tokens} tokens could not be captured: {error}")
    return milliseconds


def measure(model: nn.Module, name: str, vocab: int, device: str, smoke: bool) -> dict:
    if smoke:  # the CPU: one forward, to check that the variant builds and runs
        with torch.inference_mode():
            logits = model(torch.randint(0, vocab, (1, 8))).logits
        return {"variant": name, "finite": bool(torch.isfinite(logits).all())}
    figures = {"variant": name, "prefill_512_ms": prefill_ms(model, 512, vocab, device)}
    for tokens in PREFILL_GRAPHED:
        figures[f"prefill_{tokens}_graphed_ms"] = graphed_prefill_ms(model, tokens, vocab, device)
    if any(isinstance(module, RPQLinear) for module in model.modules()):  # the prompt route of record before, beside
        with options.using(fused_prompts=False):
            figures["prefill_512_ms_decode_cublas"] = prefill_ms(model, 512, vocab, device)
            for tokens in PREFILL_GRAPHED:
                figures[f"prefill_{tokens}_graphed_ms_decode_cublas"] = graphed_prefill_ms(model, tokens, vocab, device)
    for batch in (1, 16):
        prompt = torch.randint(0, vocab, (batch, 32), device=device)
        graphed = graphed_decode(model, prompt, steps=32, repeats=3)
        figures[f"graph_decode_b{batch}_tok_s"] = graphed.tokens_per_s
        figures[f"graph_decode_b{batch}_peak_mb"] = None if graphed.peak_memory is None else graphed.peak_memory / 1e6
        if graphed.error:
            figures[f"graph_decode_b{batch}_error"] = graphed.error
    print(json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="llama-2-7b",
                        help="whose shapes (SmolLM2-135M's head is untied here: a packed Linear like the others)")
    parser.add_argument("--layers", type=int, help="decoder blocks (default: the architecture's)")
    parser.add_argument("--codebook-size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="a tiny config on the CPU, no timing")
    parser.add_argument("--no-int4", action="store_true", help="leave out torch's int4 baseline (a shorter run)")
    parser.add_argument("--programmatic-launch", action="store_true",
                        help="also time the RPQ model with the programmatic_launch option on (decode kernels started while the one before ends)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    model = build(2 if args.smoke else args.layers, args.smoke, device, args.architecture)
    vocab = model.config.vocab_size
    results = [measure(model, "dense fp16", vocab, device, args.smoke)]
    if not args.smoke and not args.no_int4:
        model = model.to(torch.bfloat16)
        replace_linears(model, lambda linear, group: Int4Linear(linear))
        torch.cuda.empty_cache()
        results.append(measure(model, "int4 weight-only, groups of 128 (bf16)", vocab, device, args.smoke))
        model = model.to(torch.float16)
    signs: dict[str, torch.Tensor] = {}
    replace_linears(model, lambda linear, group: rpq_like(
        linear, args.codebook_size, signs.setdefault(group, random_signs(linear.in_features, len(signs)).to(device))))
    apply_fusions(model)
    if not args.smoke:
        torch.cuda.empty_cache()
    results.append(measure(model, f"RPQ, one {args.codebook_size}-entry int8 table per row, rotated", vocab, device, args.smoke))
    if args.programmatic_launch:
        with options.using(programmatic_launch=True):
            results.append(measure(model, "same, programmatic launch on", vocab, device, args.smoke))
    base = results[0]
    for row in results[1:]:
        for key in ("graph_decode_b1_tok_s", "graph_decode_b16_tok_s"):
            if row.get(key) and base.get(key):
                row[key.replace("_tok_s", "_ratio")] = row[key] / base[key]
        for key in [k for k in row if k.startswith("prefill_") and k.endswith(("_ms", "_ms_decode_cublas"))]:
            base_key = key.replace("_decode_cublas", "")
            if row.get(key) and base.get(base_key):
                row[key.replace("_ms", "_ratio")] = row[key] / base[base_key]
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if not args.smoke else "cpu", "torch": torch.__version__,
                       "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
