"""``torch.compile`` of an RPQ model: one graph, no breaks, each packed layer one custom op (``packed_ops``, which
runs the Triton kernels on CUDA and the torch forms here), the same logits as eager."""

from __future__ import annotations

import torch

from model_compress.rpq.fusions import apply_fusions
from model_compress.rpq.layers.modules import RPQLinear

from ..conftest import rotated_llama


def test_a_rotated_model_with_its_fusions_traces_as_one_graph_and_computes_the_same():
    model = rotated_llama()
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
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


def test_a_converted_checkpoint_with_its_tied_table_traces_as_one_graph(tiny_folder, tmp_path):
    import model_compress
    from model_compress.rpq.convert import RPQSettings
    from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq

    compress_rpq(str(tiny_folder("llama")), tmp_path / "out", RPQSettings(bits=4.0, rotation_block=32),
                 calibration=CalibrationOptions(tokens=1024))
    model = model_compress.load(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 9))
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]


def test_compiled_decode_of_a_rotated_model_runs_without_graph_breaks():
    """What ``compress eval --compile`` times: the static-cache decode step under torch.compile (default mode on a CPU)."""
    from model_compress.eval.compiled_decode import compiled_decode

    model = rotated_llama()
    apply_fusions(model)
    result = compiled_decode(model, torch.randint(0, model.config.vocab_size, (2, 8)), steps=3, repeats=1)
    assert result.error is None and result.graph_breaks == 0 and result.tokens_per_s > 0
