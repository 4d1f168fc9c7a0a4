"""Calibration states kept where they fit: on the fitting device, or in host memory with each window moved to the
device for its block call (the move itself is checked on a GPU, ``test_cuda.py``)."""

from __future__ import annotations

import torch

from model_compress.rpq.fit.stack import BlockCall, find_stack, run_block
from model_compress.rpq.fit.state_placement import StatePlacer

from ..conftest import tiny_model


def test_the_placer_keeps_states_on_the_gpu_where_three_times_them_fit_and_in_host_memory_otherwise():
    roomy = StatePlacer(torch.device("cuda"), windows=10, free_bytes=10_000)
    assert roomy.home(300) == torch.device("cuda") and not roomy.decision.spilled
    assert roomy.home(10**9) == torch.device("cuda")  # decided once, on the first window
    tight = StatePlacer(torch.device("cuda"), windows=10, free_bytes=10_000)
    assert tight.home(400) == torch.device("cpu") and tight.decision.spilled
    assert tight.decision.state_bytes == 4000 and "host memory" in tight.decision.describe()
    assert tight.decision.to_json()["spilled"] is True
    cpu = StatePlacer(torch.device("cpu"), windows=10)
    assert cpu.home(10**12) == torch.device("cpu") and not cpu.decision.spilled


def test_a_call_counts_and_moves_every_tensor_it_holds_and_runs_the_same():
    model = tiny_model("llama")
    block = find_stack(model, [name for name, _ in model.named_modules()]).blocks[0]
    hidden = torch.randn(2, 5, model.config.hidden_size)
    positions = model.model.rotary_emb(hidden, torch.arange(5)[None])
    calls = [BlockCall((hidden[i : i + 1],), {"position_embeddings": positions, "use_cache": False}) for i in range(2)]
    assert calls[0].nbytes() == (hidden[:1].numel() + sum(t.numel() for t in positions)) * 4
    moved = calls[0].to(torch.device("cpu"))
    assert moved.kwargs["use_cache"] is False and isinstance(moved.kwargs["position_embeddings"], tuple)
    kept = run_block(block, calls)
    for a, b in zip(kept.outputs, run_block(block, calls, run_on=torch.device("cpu")).outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
