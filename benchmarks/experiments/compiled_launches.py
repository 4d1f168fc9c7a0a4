"""How many launches a compiled decode step makes, original against compressed, counted from the code inductor
generates (on a CPU: the same graph as on a GPU, its fused kernels C++ instead of Triton).

    python benchmarks/experiments/compiled_launches.py [--batches 1 16]

A tiny Llama (two blocks, ``tests/conftest.py``) dense and with every decoder Linear a rotated 4-bit packed layer
(``rotated_llama``, fusions applied), each compiled on the static-cache decode step ``compress eval --compile``
times. Per step: inductor's fused kernels, the matrix products it hands to BLAS, attention, and each of the package's
custom ops (on a GPU each is one Triton launch, the tied head's decode route several). A launch count, not a
time: at SmolLM2's size a GPU launch costs 2-5 us whatever its bytes, so the counts say where the launches go.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import transformers
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model_compress.eval.graph_decode import DecodeStep  # noqa: E402
from model_compress.rpq.fusions import apply_fusions  # noqa: E402
from tests.conftest import rotated_llama, tiny_config  # noqa: E402

CALL = re.compile(r"^\s*(?:buf\d+ = )?(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.[\w\.]+)\(", re.M)


def launches(model: torch.nn.Module, batch: int) -> Counter:
    """Each kind of call in the compiled decode step's generated ``call`` function, counted."""
    prompt = torch.randint(3, 300, (batch, 4))
    torch._dynamo.reset()
    with torch.inference_mode():
        step = DecodeStep(model, prompt, 4)
        step.prefill()
        step.model = torch.compile(model, dynamic=False)
        _, codes = run_and_get_code(step)
    body = codes[-1].split("def call(")[-1]
    kinds = Counter()
    for name in CALL.findall(body):
        kinds["inductor fused kernel" if name.startswith("cpp_fused") else name.removeprefix("torch.ops.").removesuffix(".default")] += 1
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    compressed = rotated_llama()
    apply_fusions(compressed)
    blocks = len(dense.model.layers)
    for batch in args.batches:
        for name, model in (("original", dense), ("compressed", compressed)):
            kinds = launches(model, batch)
            total = sum(kinds.values())
            detail = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items(), key=lambda item: -item[1]))
            print(f"batch {batch:2d} {name:10s}: {total} calls per step ({blocks} blocks): {detail}")


if __name__ == "__main__":
    main()
