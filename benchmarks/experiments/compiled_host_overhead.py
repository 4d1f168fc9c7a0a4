"""What a compiled model costs the host on every call before any kernel runs: dynamo's frame, its guards (those
checked in Python counted apart) and the attribute writes it replays, dense vs rotated packed Llama.

    python benchmarks/experiments/compiled_host_overhead.py [--layers 30] [--calls 200]

The graph is replaced by one that returns its first outputs, so what is timed is only what runs around it (CPU, tiny
widths: the host's work depends on the number of layers and tensors, not on their size). A compiled decode step
replayed from CUDA graphs waits on this whenever it exceeds the step's kernel time (``compiled_step_profile.py``
measures that on a GPU). Three models: dense, every decoder Linear a rotated 4-bit packed layer without the fusions,
and with them (``apply_fusions``, what ``model_compress.load`` gives).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import tests.conftest as test_models  # noqa: E402 - the tests' tiny models

from model_compress.rpq.fusions import apply_fusions  # noqa: E402


def models(layers: int) -> dict[str, torch.nn.Module]:
    """Dense, rotated without fusions, rotated with them: ``layers`` decoder blocks of the tests' tiny Llama."""
    config = test_models.tiny_config("llama")
    config.num_hidden_layers = layers
    built = {"dense": transformers.AutoModelForCausalLM.from_config(config).eval()}
    original = test_models.tiny_config
    test_models.tiny_config = lambda arch: config
    try:
        built["rotated, no fusions"] = test_models.rotated_llama()
        fused = test_models.rotated_llama()
    finally:
        test_models.tiny_config = original
    apply_fusions(fused)
    built["rotated, fusions"] = fused
    return built


def _returning_first_outputs(graph, example_inputs):
    outputs = graph(*example_inputs)
    return lambda *args: outputs


def host_us_per_call(model: torch.nn.Module, calls: int, repeats: int = 5) -> float:
    """Least over ``repeats`` of the mean host time of a compiled one-token call whose graph does nothing."""
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_returning_first_outputs, dynamic=False)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            compiled(ids)
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(calls):
                compiled(ids)
            times.append((time.perf_counter() - began) / calls * 1e6)
    return min(times)


def python_guards(model: torch.nn.Module) -> int:
    """How many of the compiled call's guards are checked in Python (dynamo's LAMBDA_GUARD), from its guard log."""
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    torch._logging.set_logs(guards=True)
    try:
        torch._dynamo.reset()
        with torch.inference_mode():
            torch.compile(model, backend=_returning_first_outputs, dynamic=False)(ids)
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
    return sum("LAMBDA_GUARD" in line for line in stream.getvalue().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    for label, model in models(args.layers).items():
        print(f"{label}, {args.layers} blocks: {host_us_per_call(model, args.calls):.0f} us per call on the host, "
              f"{python_guards(model)} guards checked in Python")


if __name__ == "__main__":
    main()
