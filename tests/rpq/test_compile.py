"""``torch.compile`` of an RPQ model: one graph, no breaks, each packed layer one custom op (``packed_ops``, which
runs the Triton kernels on CUDA and the torch forms here), the same logits as eager."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from model_compress.rpq.fusions import apply_fusions
from model_compress.rpq.kernels.config.packed_routes import NIBBLE_GROUP_TOKENS
from model_compress.rpq.layers.modules import RPQLinear

from ..conftest import rotated_llama


def test_a_rotated_model_with_its_fusions_traces_as_one_graph_and_computes_the_same():
    """A prompt longer than the sibling launch serves: one op per layer, one graph, the eager logits."""
    model = rotated_llama()
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (2, NIBBLE_GROUP_TOKENS // 2 + 1))
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
        assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
        traced = "\n".join(str(graph.graph) for graph in explanation.graphs)
        linears = sum(isinstance(m, RPQLinear) for m in model.modules())
        assert traced.count("model_compress.packed_linear") == linears and "model_compress.packed_rotate" in traced
        expected = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_a_converted_checkpoint_with_its_tied_table_traces_as_one_graph(arch, tiny_folder, tmp_path):
    """Each architecture's fusions (pre-norms, OPT's LayerNorms and fc1, GPT-2's Conv1D) trace without breaks, at one
    token and at a prompt, and the compiled model gives the eager logits."""
    import model_compress
    from model_compress.rpq.convert import RPQSettings
    from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

    compress_rpq(str(tiny_folder(arch)), tmp_path / "out", RPQSettings(bits=4.0, rotation_block=32),
                 calibration=CalibrationOptions(tokens=1024))
    model = model_compress.load(tmp_path / "out", dtype=torch.float32)
    for shape in ((1, 1), (2, 9)):
        ids = torch.randint(0, 300, shape)
        torch._dynamo.reset()
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(ids)
            assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager")
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_compiled_decode_of_a_rotated_model_runs_without_graph_breaks():
    """What ``compress eval --compile`` times: the static-cache decode step under torch.compile (default mode on a CPU)."""
    from model_compress.eval.compiled_decode import compiled_decode

    model = rotated_llama()
    apply_fusions(model)
    result = compiled_decode(model, torch.randint(0, model.config.vocab_size, (2, 8)), steps=3, repeats=1)
    assert result.error is None and result.graph_breaks == 0 and result.tokens_per_s > 0
    assert result.cudagraph_skips is None  # no CUDA graphs off CUDA: nothing to count


def _custom_ops_per_block(model: torch.nn.Module, ids: torch.Tensor) -> tuple[Counter, str]:
    """How often each of the package's custom ops appears in the traced graph, per decoder block; the graph's text."""
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    traced = "\n".join(str(graph.graph) for graph in explanation.graphs)
    blocks = len(model.model.layers)
    return Counter({op: count / blocks for op, count in Counter(re.findall(r"model_compress\.(\w+)", traced)).items()}), traced


def test_a_compiled_decode_step_keeps_the_eager_fusions():
    """At one token a traced block launches fewer kernels than eager decoding: q/k/v and gate/up one op each, which
    rotate x as they load it (so do o_proj's), so no rotation op is left; down_proj's op forms its input from the SiLU
    gate and rotates it as it loads it; the signs go to the ops as stored, so nothing is unpacked on every step: four
    launches of the package per block. A few tokens (a batch decoding, a short prompt) the same, up to
    ``NIBBLE_GROUP_TOKENS`` tokens; a longer prompt: each layer alone, as in eager."""
    model = rotated_llama()
    apply_fusions(model)
    one = torch.randint(0, model.config.vocab_size, (1, 1))
    ops, traced = _custom_ops_per_block(model, one)
    assert ops == {"packed_linear_group": 2, "packed_rotating_linear": 1, "packed_gated_rotating_linear": 1}
    assert "rshift" not in traced  # rotation.unpack_signs shifts the stored bits
    few = torch.randint(0, model.config.vocab_size, (2, 3))
    ops, _ = _custom_ops_per_block(model, few)
    assert ops == {"packed_linear_group": 2, "packed_rotating_linear": 1, "packed_gated_rotating_linear": 1}
    prompt = torch.randint(0, model.config.vocab_size, (1, NIBBLE_GROUP_TOKENS + 1))
    ops, _ = _custom_ops_per_block(model, prompt)
    assert ops["packed_linear"] == 7 and "packed_linear_group" not in ops
    with torch.no_grad():
        for ids in (one, few, prompt):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_compiled_group_adds_each_members_bias():
    """q/k/v with biases (Qwen2's form): the group op computes the products, the graph adds each member's bias."""
    model = rotated_llama(attention_bias=True)
    apply_fusions(model)
    one = torch.randint(0, model.config.vocab_size, (1, 1))
    ops, _ = _custom_ops_per_block(model, one)
    assert ops["packed_linear_group"] == 2
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(one).logits, model(one).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_model_on_cuda_gives_the_eager_logits_and_keeps_its_cuda_graphs(mode):
    """Inductor around the custom ops, fp16 on the GPU: the eager logits, and in reduce-overhead mode no skipped graph."""
    from torch._dynamo.utils import counters

    model = rotated_llama().to("cuda", torch.float16)
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = model(ids).logits.float()
        compiled = torch.compile(model, mode=mode)
        for _ in range(3):  # compiles, records, replays
            out = compiled(ids).logits.float()
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.gpu
def test_compiled_decode_on_cuda_replays_cuda_graphs():
    """What ``compress eval --compile`` times on a GPU: reduce-overhead, no graph skipped, no break."""
    from model_compress.eval.compiled_decode import compiled_decode

    model = rotated_llama().to("cuda", torch.float16)
    apply_fusions(model)
    result = compiled_decode(model, torch.randint(0, model.config.vocab_size, (1, 8), device="cuda"), steps=4, repeats=1)
    assert result.error is None and result.graph_breaks == 0 and result.cudagraph_skips == 0


def test_with_the_rotation_in_load_off_a_traced_block_rotates_in_ops_of_its_own(monkeypatch):
    """``rotate_in_load`` off (MODEL_COMPRESS_ROTATE_IN_LOAD=0, read from the environment: a traced graph does not see a
    ``using`` block): the norms write x R with one op for their readers and the gate its own op again, so the two forms
    can be timed against each other; the logits stay the eager ones."""
    from model_compress.rpq.kernels.config import options

    model = rotated_llama()
    apply_fusions(model)
    one = torch.randint(0, model.config.vocab_size, (1, 1))
    monkeypatch.setattr(options, "_ENVIRONMENT", [options.RPQOptions(rotate_in_load=False)])
    ops, _ = _custom_ops_per_block(model, one)
    assert ops == {"packed_linear_group": 2, "packed_linear": 2, "packed_rotate": 3, "packed_gated_silu_rotate": 1}
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(one).logits, model(one).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, NIBBLE_GROUP_TOKENS + 6])
def test_a_compiled_forward_writes_nothing_back_onto_the_model(tokens):
    """What the fusions share between layers (one rotation for the siblings, their one launch, which norm wrote x R)
    is carried by the traced tensors, not by objects of the model: a compiled model replays every attribute its trace
    changed on such objects after each call, on the host, which made a compiled decode step host-bound."""
    import warnings

    model = rotated_llama()
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    torch._dynamo.reset()
    with (warnings.catch_warnings(record=True) as caught, torch.no_grad(),
          torch._dynamo.config.patch(side_effect_replay_policy="warn")):
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    replayed = [source for w in caught if "side effects" in str(w.message)
                for source in re.findall(r"\"(L\[[^\"]*)\"", str(w.message))]
    assert replayed == []
