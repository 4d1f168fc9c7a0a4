"""Defaults of `compress rpq` that the command line shows in its help (plain numbers: no torch import).

The bit budget: 4.5 bits per weight (all weights, the embedding table included) is the smallest
budget measured where a small decoder stays close to its original: SmolLM2-135M went from perplexity
17.75 to 19.9 (1.12x) with GPU defaults and the input rotation, against 27.7 for 4-bit round-to-nearest at
4.25 bits (benchmarks/RESULTS.md). The loss a budget costs differs by model (GPTQ and AQLM report smaller
losses on larger models): `compress eval` says what a conversion kept.

Calibration and fine-tuning depend on the device: a GPU takes GPTQ's usual 128 windows of 2048 tokens
(capped by the text) and 400 fine-tuning steps, about two minutes for a small model (1000 steps gained
SmolLM2-135M another 0.7% of perplexity for 2.3 times the fine-tuning time); on a CPU one fine-tuning step of
a 135M model takes about ten seconds, so it is off there, and 12 windows (24,576 tokens) keep the default
model's conversion under ten minutes on two cores (6 windows: 6.6 minutes and 1.18x on 32,768 Wikipedia
tokens; 12: 9.3 minutes and 1.16x).
"""

DEFAULT_BITS = 4.5
# The Hadamard block of the input rotation: a width it does not divide takes the largest power of two that
# does (SmolLM2's 576 takes 64). Chosen by benchmarks/rpq/rotation_blocks.py (benchmarks/RESULTS.md).
DEFAULT_ROTATION_BLOCK = 64
# Rounds of code sweep + least-squares refit per layer: the first refit lowers a layer's output error by a
# third to a half, the second round by about 1%, a third by under 1% (SmolLM2-135M, every layer type). On
# a CPU, where the refit's products take most of the fitting time, one round.
DEFAULT_ROUNDS = {"cuda": 2, "cpu": 1}
CALIBRATION_WINDOW = 2048
CALIBRATION_TOKENS = {"cuda": 128 * CALIBRATION_WINDOW, "cpu": 12 * CALIBRATION_WINDOW}
# Calibration windows of the one forward + backward pass that weighs the layers (fit/sensitivity.py): on a
# CPU that pass costs about half a minute a window for the default model.
SENSITIVITY_WINDOWS = {"cuda": 2, "cpu": 1}
FINETUNE_STEPS = {"cuda": 400, "cpu": 0}


def for_device(table: dict, device) -> object:
    """The entry of a per-device table for ``device`` (a torch.device): "cuda" on a GPU, "cpu" elsewhere."""
    return table["cuda" if device.type == "cuda" else "cpu"]
