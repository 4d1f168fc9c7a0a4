"""The coverage matrix: a tiny random model of every family in tests/families.py goes through `compress rpq`, is
saved, loaded with ``model_compress.load`` and with transformers' Auto class, and must give the logits of the
original model with its weights replaced by the decoded codes (and generate, for decoders). The same families go
through `compress fff-distill`: the saved trees load and give the distilled model's logits, and with every leaf
on the trees give the original's. A family either passes or is refused with its line before the weights load."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import model_compress
from model_compress.core.text import Text
from model_compress.core.errors import UserError
from model_compress.rpq import pipeline as rpq_pipeline
from model_compress.rpq.convert import RPQSettings
from model_compress.rpq.layers.modules import RPQTiedHead
from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq
from model_compress.fff import pipeline as fff_pipeline
from model_compress.fff.distill import FFFSettings
from model_compress.fff.tree import FastFeedForward

from .conftest import ENGLISH, tiny_tokenizer
from .families import AUTO, CAUSAL, EXPECTED_DENSE, FAMILIES, FFF_REFUSED, KNOWN_FAILURES, MASKED, REFUSED, SEQ2SEQ, family_model

FFF_SETTINGS = FFFSettings(depth=2, steps=3, calib_tokens=1024, seq_len=64)


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
    kind = saved_family(family, tmp_path / "in")
    run = compress_rpq(str(tmp_path / "in"), tmp_path / "out", RPQSettings(bits=4.0), calibration=CalibrationOptions(tokens=512, seq_len=64))
    assert run.summary.bits_per_weight <= 4.0 and run.config.dense == EXPECTED_DENSE.get(family, {}), run.config.dense
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


def saved_family(family: str, folder) -> str:
    """The family's tiny model and a tokenizer saved in ``folder``; its kind."""
    _, kind, _ = FAMILIES[family]
    family_model(family).save_pretrained(folder)
    tiny_tokenizer("bert" if kind == MASKED else "llama").save_pretrained(folder)
    return kind


def check_refused_with_one_line_before_any_work(family: str, tmp_path) -> None:
    """Called by the matrix for the families in REFUSED: `compress rpq` stops with its line, before the weights
    load, and writes nothing."""
    saved_family(family, tmp_path / "in")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rpq_pipeline, "open_model", lambda *a, **k: pytest.fail("loaded the weights before refusing"))
        with pytest.raises(UserError, match=REFUSED[family]):
            compress_rpq(str(tmp_path / "in"), tmp_path / "out", RPQSettings(bits=4.0), calibration=CalibrationOptions(tokens=512, seq_len=64))
    assert not (tmp_path / "out").exists()


def all_leaves_on(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every tree computing all its leaves (each leaf an exact slice of the dense block's neurons)."""
    for tree in model.modules():
        if isinstance(tree, FastFeedForward):
            tree.forward = tree.all_leaves_forward
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_distils_saves_loads_and_its_trees_hold_the_dense_blocks(family, tmp_path):
    kind = saved_family(family, tmp_path / "in")
    text = Text("english", "test", [ENGLISH] * 8)
    if family in FFF_REFUSED:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fff_pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the weights before refusing"))
            with pytest.raises(UserError, match=FFF_REFUSED[family]):
                fff_pipeline.distill_fff(str(tmp_path / "in"), tmp_path / "out", FFF_SETTINGS, text)
        assert not (tmp_path / "out").exists()
        return
    run = fff_pipeline.distill_fff(str(tmp_path / "in"), tmp_path / "out", FFF_SETTINGS, text)
    assert len(run.config.blocks) == 2
    loaded = model_compress.load(tmp_path / "out", dtype=torch.float32)
    auto = AUTO[kind].from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = run.model(ids).logits
        for model in (loaded, auto):
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        if kind == CAUSAL:
            prompt = ids[:, :5]
            want = run.model.generate(prompt, max_new_tokens=4, do_sample=False)
            assert torch.equal(loaded.generate(prompt, max_new_tokens=4, do_sample=False), want)
        # the layout was read right: with all leaves on, a tree is its dense block (before any training)
        untrained = fff_pipeline.distill_fff(str(tmp_path / "in"), None, FFFSettings(depth=2, steps=0, refit=False, calib_tokens=1024, seq_len=64), text)
        torch.testing.assert_close(all_leaves_on(untrained.model)(ids).logits, family_model(family)(ids).logits, rtol=1e-4, atol=1e-4)
