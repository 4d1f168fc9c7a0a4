"""Defaults of `compress rpq` that the command line shows in its help (plain numbers: no torch import).

The bit budget: 4.5 bits per weight is where the measured models kept most of their quality
(benchmarks/RESULTS.md: perplexity within a few tenths of the original's on both decoders tried),
at a little over a quarter of their 16-bit size. Calibration and fine-tuning depend on the device:
a GPU takes GPTQ's usual 128 windows of 2048 tokens (capped by the text) and a few hundred
fine-tuning steps in about a minute for a small model; on a CPU one fine-tuning step of a 135M
model takes about ten seconds, so it is off there, and 8 windows (16,384 tokens) keep the default
model's conversion within minutes on two cores.
"""

DEFAULT_BITS = 4.5
# Rounds of code sweep + least-squares refit per layer: the first refit lowers a layer's output error by a
# third to a half, the second round by about 1%, a third by under 1% (SmolLM2-135M, every layer type). On
# a CPU, where the refit's products take most of the fitting time, one round.
DEFAULT_ROUNDS = {"cuda": 2, "cpu": 1}
CALIBRATION_WINDOW = 2048
CALIBRATION_TOKENS = {"cuda": 128 * CALIBRATION_WINDOW, "cpu": 6 * CALIBRATION_WINDOW}
# Calibration windows of the one forward + backward pass that weighs the layers (fit/sensitivity.py): on a
# CPU that pass costs about half a minute a window for the default model.
SENSITIVITY_WINDOWS = {"cuda": 2, "cpu": 1}
FINETUNE_STEPS = {"cuda": 400, "cpu": 0}


def for_device(table: dict, device) -> object:
    """The entry of a per-device table for ``device`` (a torch.device): "cuda" on a GPU, "cpu" elsewhere."""
    return table["cuda" if device.type == "cuda" else "cpu"]
