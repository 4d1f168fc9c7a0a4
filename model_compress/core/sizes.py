"""How big a model is: parameters and the bytes a checkpoint of it holds."""

from __future__ import annotations

from torch import nn

MB = 1e6
DEFAULT_INPUT_FORM = "weight files"  # how an input is named when the summary does not say (older reports)
SAME_SIZE = 0.005  # sizes within half a percent are the same size (routers added to an FFF block, say)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and persistent buffer (what a checkpoint holds)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def by_magnitude(value: float, steps: tuple[tuple[float, str], ...]) -> str:
    """``value`` in the format of the first (bound, format spec) step whose bound its magnitude reaches."""
    for bound, spec in steps:
        text = format(value, spec)
        if abs(float(text.replace(",", ""))) >= bound:  # as printed: 0.9996 is "1.00", not "1"
            return text
    return format(value, steps[-1][1])


MEGABYTE_STEPS = ((100, ",.0f"), (10, ".1f"), (1, ".2f"), (0, ".2g"))
RATIO_STEPS = ((1000, ",.0f"), (100, ".0f"), (10, ".1f"), (1, ".2f"), (0, ".3g"))


def megabytes(count: int | float) -> str:
    """Bytes as MB with as many digits as the size needs: 538 MB, 76.1 MB, 0.38 MB, 0.053 MB."""
    return f"{by_magnitude(count / MB, MEGABYTE_STEPS)} MB"


def ratio(value: float) -> str:
    """A ratio with digits by magnitude: 0.128, 1.15, 12.3, 6,441 (never 6440.629)."""
    return by_magnitude(value, RATIO_STEPS)


def smaller_or_larger(before: int, after: int) -> str:
    """'(3.23x smaller)' or '(1.70x LARGER)': which way a size went, in plain words."""
    if after <= 0 or before <= 0:
        return ""
    if abs(after / before - 1) < SAME_SIZE:
        return "(the same size)"
    if after <= before:
        return f"({ratio(before / after)}x smaller)"
    return f"({ratio(after / before)}x LARGER)"


def disk_sizes_line(input_bytes: int | None, output_bytes: int | None, input_label: str) -> str | None:
    """The sizes a user compares: the input's weight files as given against the output's, both on disk."""
    if output_bytes is None:
        return None
    if input_bytes is None:
        return f"on disk: output weights {megabytes(output_bytes)} (the input's size on disk is unknown)"
    return (
        f"on disk: input {megabytes(input_bytes)} ({input_label}) -> output weights {megabytes(output_bytes)} "
        f"{smaller_or_larger(input_bytes, output_bytes)}"
    )


def larger_than_input_warning(input_bytes: int | None, output_bytes: int | None, input_label: str | None) -> str | None:
    """Plain words when the result takes more disk than what the user started from (a quantized GGUF, say)."""
    input_label = input_label or DEFAULT_INPUT_FORM
    if input_bytes is None or output_bytes is None or output_bytes <= input_bytes * (1 + SAME_SIZE):
        return None
    return (
        f"the output's weights ({megabytes(output_bytes)}) are larger on disk than the input ({megabytes(input_bytes)}, "
        f"{input_label}): the input was stored more compactly than the result; it is smaller only against the model in memory"
    )


def size_lines(
    original_bytes: int, result_bytes: int, input_bytes: int | None, output_bytes: int | None, input_form: str | None
) -> list[str]:
    """The size lines of a method's summary: in memory, then on disk against the input as given (when saved)."""
    lines = [f"in memory: {megabytes(original_bytes)} -> {megabytes(result_bytes)} {smaller_or_larger(original_bytes, result_bytes)}"]
    disk = disk_sizes_line(input_bytes, output_bytes, input_form or DEFAULT_INPUT_FORM)
    return lines + ([disk] if disk is not None else [])
