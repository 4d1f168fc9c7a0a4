"""The capturable decode step: same tokens as generate, and no host sync inside it (checked on the CPU)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model_compress.eval.graph_decode import DecodeStep
from tests.conftest import tiny_model

HOST_SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)


class FailOnHostSync(TorchDispatchMode):
    """Raise where an op would make a CUDA stream wait for the host (``.item()``, ``bool(t)``, ``nonzero``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            raise AssertionError(f"host sync inside the decode step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_decode_step_matches_generate_without_host_syncs(arch: str) -> None:
    model = tiny_model(arch).eval()
    torch.manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (2, 6))
    steps = 5
    with torch.inference_mode():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
        )[:, prompt.shape[1] :]
        step = DecodeStep(model, prompt, steps)
        step.prefill()
        produced = [step.token.clone()]
        # transformers takes its capture-safe branches while a CUDA stream is capturing: pretend one is.
        with mock.patch("torch.cuda.is_current_stream_capturing", return_value=True), FailOnHostSync():
            for _ in range(steps - 1):
                produced.append(step().clone())
            # Timing replays the steps many times from the prompt's end: a rewind must give the same tokens.
            for _ in range(2):
                step.rewind()
                step.token.copy_(produced[0])
                again = [step.token.clone()] + [step().clone() for _ in range(steps - 1)]
                assert torch.equal(torch.cat(again, dim=1), expected)
    assert torch.equal(torch.cat(produced, dim=1), expected)


def test_host_sync_check_catches_a_sync() -> None:
    with pytest.raises(AssertionError, match="host sync"), FailOnHostSync():
        torch.ones(3).sum().item()


def test_a_decode_measurement_that_could_not_run_is_one_warning_line_naming_the_model_and_the_reason():
    from model_compress.eval.compare import Measurement, _decode_failures
    from model_compress.eval.latency import LatencyResult

    latency = LatencyResult("cuda-events", 512, 1.0, graph_decode_errors={16: "capture failed"},
                            compiled_decode_errors={1: "BackendCompilerFailed: no compiler"})
    compressed = Measurement("compressed", "out", "LlamaForCausalLM", 1, 1, 1, 0.0, latency=latency)
    lines = _decode_failures(None, compressed)
    assert lines == ["the compressed model's decode from a CUDA graph at batch 16 did not run: capture failed",
                     "the compressed model's decode compiled at batch 1 did not run: BackendCompilerFailed: no compiler"]


def test_a_graphed_prefill_is_a_table_row_and_one_that_could_not_run_a_warning_line():
    from model_compress.eval.compare import Measurement, _decode_failures
    from model_compress.eval.latency import LatencyResult
    from model_compress.eval.report import _figure

    latency = LatencyResult("cuda-events", 512, 20.0, prefill_graphed_ms=4.5)
    compressed = Measurement("compressed", "out", "LlamaForCausalLM", 1, 1, 1, 0.0, latency=latency)
    assert _figure(compressed, ("latency", "prefill_graphed_ms")) == 4.5
    assert latency.to_json()["prefill_graphed_ms"] == 4.5
    failed = LatencyResult("cuda-events", 512, 20.0, prefill_graphed_error="operation not permitted when stream is capturing")
    original = Measurement("original", "src", "LlamaForCausalLM", 1, 1, 1, 0.0, latency=failed)
    assert _decode_failures(original, None) == [
        "the original model's prefill from a CUDA graph did not run: operation not permitted when stream is capturing"]
