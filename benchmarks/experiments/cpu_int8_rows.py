"""Would int8 rows make the CPU path faster than the 16-bit decoded copy (``--decode-weights``)?

    python benchmarks/experiments/cpu_int8_rows.py FOLDER [--tokens 32] [--json FILE]

The budget's Linear formats are int8 tables with one scale per table, so W' (the weight in the rotated basis) is
exactly int8 rows times a per-row scale: one byte per weight, half the 16-bit copy, and torch has a CPU kernel for
that product (``torch._weight_int8pack_mm``, bf16 activations). The catch: W' multiplies x R, so the rotations run
at every call (the 16-bit copy is decoded back into the model's basis and needs none). This loads FOLDER (a
``compress rpq`` output of a Llama-family model with a tied head) three ways: as saved (codes unpacked on every
call), with ``decode_weights=True``, and with every int8-table Linear and the tied head/embedding swapped to int8 rows
(``forward_rotated`` patched here, benchmark code), and times greedy ``generate`` of ``--tokens`` tokens at batch 1
after a 64-token prompt, on the CPU's threads. The product would offer an int8 option only if it wins.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch
import torch.nn.functional as F

import model_compress
from model_compress.rpq.kernels.layout import EMBEDDING, LINEAR, decode, unpack_codes
from model_compress.rpq.layers.modules import RPQLinear, RPQTiedHead


def int8_rows(model: torch.nn.Module) -> int:
    """Swap every int8-table RPQ Linear, and a tied head with its embedding, to int8 rows; the bytes they hold."""
    held = 0
    for module in model.modules():
        if isinstance(module, RPQLinear) and module.codebook_scales is not None:
            rows = decode(module.codebooks.float(), unpack_codes(module.indices, module.code_bits, module.in_features), LINEAR)
            weight = rows.round().to(torch.int8).contiguous()
            scales = module.codebook_scales.float().repeat_interleave(module.codebooks.shape[2]).to(torch.bfloat16)
            held += weight.numel() + 2 * scales.numel()
            module.forward_rotated = types.MethodType(_rows_product(weight, scales), module)
        if isinstance(module, RPQTiedHead) and module.embedding.codebook_scales is not None:
            table = module.embedding
            rows = decode(table.codebooks.float(), unpack_codes(table.indices, table.code_bits, table.num_embeddings), EMBEDDING)
            weight = rows.round().to(torch.int8).contiguous()
            columns = table.codebook_scales.float().repeat_interleave(table.codebooks.shape[2])
            held += weight.numel()
            ones = torch.ones(weight.shape[0], dtype=torch.bfloat16)
            product = _rows_product(weight, ones)
            module.forward = types.MethodType(lambda self, x, p=product, t=table, c=columns: p(self, t.rotate_alone(x) * c), module)
            table.forward = types.MethodType(lambda self, ids, w=weight, c=columns: self.unrotate_rows(w[ids].float() * c), table)
    return held


def _rows_product(weight: torch.Tensor, scales: torch.Tensor):
    def forward_rotated(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= 16:
            out = torch._weight_int8pack_mm(rows.to(torch.bfloat16), weight, scales).to(x.dtype)
        else:
            out = F.linear(rows, weight.to(x.dtype)) * scales.to(x.dtype)
        if getattr(self, "bias", None) is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)

    return forward_rotated


def tokens_per_second(model: torch.nn.Module, tokens: int) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(2):
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for name in ("codes", "decoded 16-bit", "int8 rows"):
        model = model_compress.load(args.folder, decode_weights=name == "decoded 16-bit").eval()
        extra = int8_rows(model) if name == "int8 rows" else 0
        results[name] = {"tokens_per_second": tokens_per_second(model, args.tokens), "extra_bytes": extra}
        print(f"{name:16s} {results[name]['tokens_per_second']:6.2f} tokens/s, int8 rows {extra / 1e6:.1f} MB", flush=True)
        del model
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
