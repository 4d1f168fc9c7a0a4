"""Calibration windows: spread over the whole text, held-out windows spread too, the packaged mix."""

from __future__ import annotations

import torch

from model_compress.core.text import Text
from model_compress.rpq.fit.calibration import calibration_set, spread

from ..conftest import real_model_folder


class CountingTokenizer:
    """Every word is its own id (its position in the text), no special tokens: windows show where they came from."""

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = False) -> dict:
        return {"input_ids": list(range(len(text.split())))}


def test_spread_gives_distinct_ordered_evenly_spaced_indices():
    for total in (1, 2, 7, 38, 180):
        for wanted in range(0, total + 3):
            chosen = spread(total, wanted).tolist()
            assert chosen == sorted(set(chosen)) and len(chosen) == min(total, wanted)
            assert all(0 <= index < total for index in chosen)
            if 2 <= wanted < total:
                gaps = [b - a for a, b in zip(chosen, chosen[1:])]
                assert max(gaps) - min(gaps) <= 1


def test_windows_come_from_the_whole_text_not_only_its_start():
    text = Text("words", "test", [" ".join(["w"] * 100 * 16)])  # 100 windows of 16 tokens
    calibration = calibration_set(CountingTokenizer(), text, 16, 10 * 16, hold_out=True)
    starts = sorted([*calibration.fit[:, 0].tolist(), *calibration.held_out[:, 0].tolist()])
    assert len(starts) == 10 and starts[0] < 16 * 10 and starts[-1] >= 16 * 90  # first and last tenth both drawn
    assert all(int(w[0]) % 16 == 0 and torch.equal(w, torch.arange(w[0], w[0] + 16)) for w in calibration.fit)


def test_held_out_windows_are_spread_and_never_fitted_on():
    text = Text("words", "test", [" ".join(["w"] * 40 * 8)])
    calibration = calibration_set(CountingTokenizer(), text, 8, 40 * 8, hold_out=True)
    fitted = set(calibration.fit[:, 0].tolist())
    held = calibration.held_out[:, 0].tolist()
    assert len(held) == 4 and not fitted & set(held) and len(fitted) == 36
    assert held[0] < 8 * 10 and held[-1] >= 8 * 30  # not the last four windows of the text


def test_the_packaged_calibration_mix_holds_several_kinds_of_text_and_not_the_eval_text():
    from model_compress.core.text import calibration_text, default_text

    real_model_folder("exllamav2", "exllamav2==0.3.2")
    calibration = calibration_text()
    joined = calibration.joined
    assert "def " in joined or "#include" in joined  # source code
    assert any(ord(ch) > 0x3000 for ch in joined)  # a script beyond Latin (the multilingual sample)
    evaluation = default_text().joined
    assert not any(doc[:200] in evaluation for doc in calibration.documents)
