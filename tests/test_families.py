"""The coverage matrix: a tiny random model of every family in tests/families.py goes through `compress rpq`, is
saved, loaded with ``model_compress.load`` and with transformers' Auto class, and must give the logits of the
original model with its weights replaced by the decoded codes (and generate, for decoders)."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import model_compress
from model_compress.quantize.convert import RPQSettings
from model_compress.quantize.layers import RPQTiedHead
from model_compress.quantize.pipeline import CalibrationOptions, compress_rpq

from .conftest import tiny_tokenizer
from .families import AUTO, CAUSAL, FAMILIES, MASKED, SEQ2SEQ, family_model

# Families the conversion refuses up front, with the line it gives.
REFUSED = {"T5": "model type t5: encoder-decoder models are not supported"}
KNOWN_FAILURES: dict[str, str] = {}  # families that convert but wrongly: none


def decoded_reference(original: torch.nn.Module, converted: torch.nn.Module) -> torch.nn.Module:
    """``original`` with every converted layer's weight replaced by what its codes decode to."""
    with torch.no_grad():
        for name, module in converted.named_modules():
            if not (hasattr(module, "code_bits") or isinstance(module, RPQTiedHead)):
                continue
            dense = original.get_submodule(name)
            decoded = module.dequantize().to(dense.weight.dtype)
            if isinstance(module, RPQTiedHead):
                assert dense.weight is original.get_input_embeddings().weight, name
            dense.weight.copy_(decoded.t() if isinstance(dense, Conv1D) else decoded)
    return original


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[f], strict=True)) if f in KNOWN_FAILURES else f for f in FAMILIES]
)
def test_a_family_converts_saves_loads_and_matches_its_decoded_weights(family, tmp_path):
    if family in REFUSED:
        return check_refused_with_one_line_before_any_work(family, tmp_path)
    _, kind, _ = FAMILIES[family]
    original = family_model(family)
    original.save_pretrained(tmp_path / "in")
    tiny_tokenizer("bert" if kind == MASKED else "llama").save_pretrained(tmp_path / "in")
    run = compress_rpq(str(tmp_path / "in"), tmp_path / "out", RPQSettings(bits=4.0), calibration=CalibrationOptions(tokens=512, seq_len=64))
    assert run.summary.bits_per_weight <= 4.0 and not run.config.dense, run.config.dense
    reference = decoded_reference(family_model(family), run.model)
    loaded = model_compress.load(tmp_path / "out", dtype=torch.float32)
    auto = AUTO[kind].from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids[:, :4]} if kind == SEQ2SEQ else {}
    with torch.no_grad():
        expected = reference(ids, **extra).logits
        for model in (run.model, loaded, auto):
            got = model(ids, **extra).logits
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if kind in (CAUSAL, SEQ2SEQ):
        prompt = ids[:, :5]
        want = reference.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=4, do_sample=False), want)


def check_refused_with_one_line_before_any_work(family: str, tmp_path) -> None:
    """Called by the matrix for the families in REFUSED: `compress rpq` stops with its line and writes nothing."""
    from model_compress.errors import UserError

    family_model(family).save_pretrained(tmp_path / "in")
    tiny_tokenizer("llama").save_pretrained(tmp_path / "in")
    with pytest.raises(UserError, match=REFUSED[family]):
        compress_rpq(str(tmp_path / "in"), tmp_path / "out", RPQSettings(bits=4.0), calibration=CalibrationOptions(tokens=512, seq_len=64))
    assert not (tmp_path / "out").exists()
