"""The PNG of `compress eval`: a panel per figure, log scales where values span decades, every bar labelled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_compress.eval.compare import EvalResult, Measurement
from model_compress.eval.report import plot_figure, write_plot

pytest.importorskip("matplotlib")


def _result() -> EvalResult:
    """A destroyed model beside its original: perplexity 17.75 against 120,877 (the case a linear axis hides)."""

    def measured(role: str, perplexity: float, weight_bytes: int) -> Measurement:
        return Measurement(role, f"{role}-label", "LlamaForCausalLM", 1000, weight_bytes, weight_bytes, 0.0,
                           quality={"perplexity": perplexity, "nll_mean": 2.9 if role == "original" else 11.7})

    return EvalResult(
        checkpoint=Path("out/smol-rpq"), metric="perplexity", dtype=torch.float16, device=torch.device("cpu"),
        text={"name": "Wikipedia sample", "tokens_used": 4096}, compressed=measured("compressed", 120_877.0, 86_000_000),
        original=measured("original", 17.75, 269_000_000), original_error=None, compression={}, warnings=[],
    )


def _panel(figure, name: str):
    return next(axis for axis in figure.axes if axis.get_title().startswith(name))


def test_a_figure_spanning_decades_gets_a_log_scale_and_one_that_does_not_stays_linear():
    figure = plot_figure(_result())
    assert _panel(figure, "perplexity").get_yscale() == "log"
    assert _panel(figure, "mean token NLL").get_yscale() == "linear"  # 2.9 vs 11.7: under a decade


def test_every_bar_is_labelled_with_its_value_and_the_title_says_what_was_measured():
    figure = plot_figure(_result())
    assert [text.get_text() for text in _panel(figure, "perplexity").texts] == ["17.8", "120,877"]
    assert [text.get_text() for text in _panel(figure, "weights in memory").texts] == ["269.0", "86.0"]
    assert "ratio 6,810, lower is better" in _panel(figure, "perplexity").get_title()
    title = figure._suptitle.get_text()
    assert "smol-rpq" in title and "original-label" in title and "Wikipedia sample" in title and "4,096 tokens" in title
    assert "float16" in title


def test_the_plot_is_written_as_a_png(tmp_path):
    write_plot(_result(), tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no partial file left
