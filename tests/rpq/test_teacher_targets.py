"""The teacher's targets (top log-probabilities and their ids per token), computed a window at a time."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from model_compress.rpq.fit.finetune import Teacher


def test_each_windows_targets_are_its_top_log_probabilities_and_ids():
    logits = torch.randn(3, 16, 500, generator=torch.Generator().manual_seed(0)).half()
    teacher = Teacher(top_k=8)
    teacher.record(False, 0, SimpleNamespace(logits=logits))
    assert len(teacher.fit) == 3 and not teacher.held_out
    whole = F.log_softmax(logits.float(), dim=-1).topk(8, dim=-1)  # the whole batch at once, as a reference
    for window, (values, ids) in enumerate(teacher.fit):
        assert values.shape == (16, 8) and ids.dtype == torch.int32
        assert torch.equal(ids.long(), whole.indices[window])
        torch.testing.assert_close(values, whole.values[window], rtol=0, atol=1e-6)
        assert torch.all(values[:, :-1] >= values[:, 1:])  # best first
        assert torch.all(values.exp().sum(-1) <= 1 + 1e-5)
