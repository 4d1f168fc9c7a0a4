"""End-to-end distillation's losses: KL for language models, pooled-embedding cosine for bare encoders."""

from __future__ import annotations

import json

import torch
import transformers

from model_compress.core.text import Text
from model_compress.fff.distill import FFFSettings, output_distance
from model_compress.fff.pipeline import distill_fff

from ..conftest import ENGLISH, tiny_config, tiny_tokenizer


def test_the_encoder_loss_is_the_pooled_cosine_and_ignores_padding():
    torch.manual_seed(0)
    states = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    assert output_distance(("hidden", states), ("hidden", states), mask).abs() < 1e-6
    padded_changed = states.clone()
    padded_changed[1, 4:] += 5.0
    assert output_distance(("hidden", padded_changed), ("hidden", states), mask).abs() < 1e-6
    scaled = states * 3.0  # a cosine: the embeddings' length does not count
    assert output_distance(("hidden", scaled), ("hidden", states), mask).abs() < 1e-6
    other = torch.randn(3, 6, 8)
    pooled = lambda s: (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = 1 - torch.nn.functional.cosine_similarity(pooled(other), pooled(states), dim=-1).mean()
    torch.testing.assert_close(output_distance(("hidden", other), ("hidden", states), mask), expected)


def test_end_to_end_distillation_brings_a_bare_encoders_embeddings_closer(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert-encoder"
    encoder = transformers.BertModel(tiny_config("bert")).eval()
    with torch.no_grad():  # random FF blocks barely move a random encoder's embeddings: make them count
        for layer in encoder.encoder.layer:
            layer.intermediate.dense.weight.mul_(8)
            layer.output.dense.weight.mul_(8)
    encoder.save_pretrained(folder)
    tiny_tokenizer("bert").save_pretrained(folder)
    settings = FFFSettings(depth=3, steps=0, calib_tokens=2048, seq_len=64, e2e_steps=40, e2e_lr=1e-3)
    distill_fff(str(folder), tmp_path / "out", settings, Text("english", "test", [ENGLISH] * 16))
    e2e = json.loads((tmp_path / "out" / "compression_report.json").read_text())["summary"]["e2e"]
    assert e2e["loss"] == "1 - cosine of mean-pooled embeddings"
    assert e2e["before"] > 1e-3 and e2e["after"] < 0.8 * e2e["before"], e2e
