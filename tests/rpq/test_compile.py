"""``torch.compile`` of an RPQ model on the torch path: one graph, no breaks, the same logits as eager."""

from __future__ import annotations

import torch

from model_compress.rpq.fusions import apply_fusions

from ..conftest import rotated_llama


def test_a_rotated_model_with_its_fusions_traces_as_one_graph_and_computes_the_same():
    model = rotated_llama()
    apply_fusions(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
        assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
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
