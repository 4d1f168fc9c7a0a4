"""Sizes and ratios as a reader wants them: digits by magnitude, which way a size went, the disk line."""

from __future__ import annotations

import pytest

from model_compress.core.sizes import disk_sizes_line, larger_than_input_warning, megabytes, ratio, smaller_or_larger


@pytest.mark.parametrize(
    "value, text",
    [(6440.629, "6,441"), (120.4, "120"), (12.34, "12.3"), (1.146, "1.15"), (1.0, "1.00"), (0.128, "0.128"), (0.02684, "0.0268"), (0.9996, "1.00"), (999.7, "1,000")],
)
def test_ratios_take_digits_by_magnitude(value, text):
    assert ratio(value) == text


@pytest.mark.parametrize("count, text", [(538.1e6, "538 MB"), (76.06e6, "76.1 MB"), (1.5e6, "1.50 MB"), (52_952, "0.053 MB")])
def test_megabytes_never_round_a_small_size_to_zero(count, text):
    assert megabytes(count) == text


def test_which_way_a_size_went_is_said_in_words():
    assert smaller_or_larger(538, 76) == "(7.08x smaller)"
    assert smaller_or_larger(98, 166) == "(1.69x LARGER)"
    assert smaller_or_larger(90_900, 90_930) == "(the same size)"


def test_the_disk_line_and_the_warning_compare_against_the_input_as_given():
    assert disk_sizes_line(98_400_000, 166_300_000, "GGUF") == "on disk: input 98.4 MB (GGUF) -> output weights 166 MB (1.69x LARGER)"
    assert "unknown" in disk_sizes_line(None, 1_000_000, "weight files")
    assert disk_sizes_line(1, None, "GGUF") is None
    warning = larger_than_input_warning(98_400_000, 166_300_000, "GGUF")
    assert "166 MB" in warning and "98.4 MB" in warning and "larger on disk" in warning
    assert larger_than_input_warning(166_300_000, 98_400_000, "GGUF") is None
    assert larger_than_input_warning(None, 98_400_000, "GGUF") is None
    assert larger_than_input_warning(90_900_000, 90_930_000, "weight files") is None  # routers beside an FFF block

