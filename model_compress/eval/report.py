"""The side-by-side report of an evaluation: table rows, the JSON document, and the PNG plot.

Ratios are compressed / original for every figure, whichever direction is better for it; each row
says which direction that is, so a reader need not guess.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from ..core.version import __version__
from ..core.sizes import MB, by_magnitude
from ..core.sizes import ratio as format_ratio
from .compare import EvalResult, Measurement


@dataclass
class Row:
    """One figure for both models: name, unit, which direction is better, and how to fetch it."""

    name: str
    unit: str
    better: str  # "lower" | "higher"
    original: float | None
    compressed: float | None

    @property
    def ratio(self) -> float | None:
        if self.original in (None, 0) or self.compressed is None:
            return None
        return self.compressed / self.original


def rows(result: EvalResult) -> list[Row]:
    """Every figure measured, in table order; a row whose figure neither model has is left out."""
    pairs = [
        (name, unit, better, _figure(result.original, key), _figure(result.compressed, key))
        for name, unit, better, key in _ROW_SPECS
    ]
    return [Row(*pair) for pair in pairs if pair[3] is not None or pair[4] is not None]


_ROW_SPECS = [
    ("perplexity", "", "lower", ("quality", "perplexity")),
    ("masked-LM perplexity", "", "lower", ("quality", "mlm_perplexity")),
    ("mean token NLL", "nats", "lower", ("quality", "nll_mean")),
    ("embedding cosine to original, mean", "", "higher", ("quality", "cosine_mean")),
    ("embedding cosine to original, min", "", "higher", ("quality", "cosine_min")),
    ("final hidden state rel. error", "", "lower", ("quality", "hidden_rel_error")),
    ("head index: greedy token = dense argmax", "%", "higher", ("quality", "head_index_agreement")),
    ("head index: approx. top-1 holds it", "%", "higher", ("quality", "head_index_recall_top1")),
    ("head index: approx. top-64 holds it", "%", "higher", ("quality", "head_index_recall_top64")),
    ("head index: whole head computed", "%", "lower", ("quality", "head_index_fallback_rate")),
    ("head index: shortlist, mean rows", "", "lower", ("quality", "head_index_shortlist_mean")),
    ("LM head, one position, every row", "ms", "lower", ("quality", "head_ms_dense")),
    ("LM head, one position, from the index", "ms", "lower", ("quality", "head_ms_index")),
    ("prefill / forward, batch 1", "ms", "lower", ("latency", "prefill_ms")),
    ("prefill, batch 1, CUDA graph", "ms", "lower", ("latency", "prefill_graphed_ms")),
    ("FF blocks within prefill (hooked)", "ms", "lower", ("latency", "ff_ms")),
    ("FF blocks' share of prefill", "%", "lower", ("latency", "ff_share")),
    ("decode, batch 1", "tok/s", "higher", ("latency", "decode", 1)),
    ("decode, batch 16", "tok/s", "higher", ("latency", "decode", 16)),
    ("decode, batch 1, CUDA graph", "tok/s", "higher", ("latency", "graph_decode", 1)),
    ("decode, batch 16, CUDA graph", "tok/s", "higher", ("latency", "graph_decode", 16)),
    ("decode, batch 1, compiled", "tok/s", "higher", ("latency", "compiled_decode", 1)),
    ("decode, batch 16, compiled", "tok/s", "higher", ("latency", "compiled_decode", 16)),
    ("graph breaks, compiled decode batch 1", "", "lower", ("latency", "compiled_breaks", 1)),
    ("CUDA graphs skipped, compiled decode b1", "", "lower", ("latency", "compiled_skips", 1)),
    ("head index, graphed decode b1: not certified", "%", "lower", ("latency", "fixed_uncertified", 1)),
    ("head index, graphed decode b16: not certified", "%", "lower", ("latency", "fixed_uncertified", 16)),
    ("peak memory, quality pass", "MB", "lower", ("quality", "peak_memory_bytes")),
    ("peak memory, prefill", "MB", "lower", ("latency", "peak", "prefill")),
    ("peak memory, decode batch 1", "MB", "lower", ("latency", "peak", "decode_batch_1")),
    ("peak memory, decode batch 16", "MB", "lower", ("latency", "peak", "decode_batch_16")),
    ("peak memory, graphed decode batch 1", "MB", "lower", ("latency", "peak", "graph_decode_batch_1")),
    ("weights in memory", "MB", "lower", ("weight_bytes",)),
    ("bits per weight (in memory)", "", "lower", ("bits_per_weight",)),
    ("weights on disk", "MB", "lower", ("disk_bytes",)),
]


_PERCENT = {"head_index_agreement", "head_index_recall_top1", "head_index_recall_top64", "head_index_fallback_rate"}


def _figure(measurement: Measurement | None, key: tuple) -> float | None:
    if measurement is None:
        return None
    if key[0] == "quality":
        value = measurement.quality.get(key[1])
        if value is not None and key[1] in _PERCENT:
            return 100 * value
        return value / MB if value is not None and key[1] == "peak_memory_bytes" else value
    if key[0] == "latency":
        latency = measurement.latency
        if latency is None:
            return None
        if key[1] in ("prefill_ms", "prefill_graphed_ms", "ff_ms"):  # plain figures of the result
            return getattr(latency, key[1])
        if key[1] == "ff_share":
            return None if latency.ff_share is None else 100 * latency.ff_share
        if key[1] == "decode":
            return latency.decode_tokens_per_s.get(key[2])
        if key[1] == "graph_decode":
            return latency.graph_decode_tokens_per_s.get(key[2])
        if key[1] == "compiled_decode":
            return latency.compiled_decode_tokens_per_s.get(key[2])
        if key[1] == "compiled_breaks":
            return latency.compiled_decode_graph_breaks.get(key[2])
        if key[1] == "compiled_skips":
            return latency.compiled_decode_cudagraph_skips.get(key[2])
        if key[1] == "fixed_uncertified":
            value = latency.fixed_head_uncertified.get(key[2])
            return None if value is None else 100 * value
        value = latency.peak_memory.get(key[2])
        return value / MB if value is not None else None
    if key[0] == "bits_per_weight":
        return measurement.bits_per_weight
    value = getattr(measurement, key[0])
    return value / MB if value is not None else None


def to_json(result: EvalResult) -> dict:
    """Every figure and the settings it was measured under."""
    device = result.device
    return {
        "tool": {"name": "model-compress", "version": __version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(result.checkpoint),
        "metric": result.metric,
        "device": {
            "type": device.type,
            "name": device_name(device),
            "threads": torch.get_num_threads(),
        },
        "dtype": str(result.dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "text": result.text,
        "settings": _settings_json(result),
        "compression": {
            key: result.compression.get(key)
            for key in ("quant_method", "bits", "num_codebooks", "codebook_size", "codebook_bits", "skip", "base_model")
        },
        "original": result.original.to_json() if result.original else None,
        "original_error": result.original_error,
        "compressed": result.compressed.to_json(),
        "rows": [
            {"name": row.name, "unit": row.unit, "better": row.better, "original": row.original, "compressed": row.compressed, "ratio": row.ratio}
            for row in rows(result)
        ],
        "warnings": result.warnings,
    }


def _settings_json(result: EvalResult) -> dict | None:
    """What the run was asked to do (the text's actual windows and tokens are under "text")."""
    settings = result.settings
    if settings is None:
        return None
    latency = settings.latency
    return {
        "metric_requested": settings.metric,
        "seq_len_requested": settings.seq_len,
        "max_tokens": settings.max_tokens,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "decode_weights": settings.decode_weights,
        "latency": None if latency is None else {
            "prompt_len": latency.prompt_len,
            "new_tokens": latency.new_tokens,
            "decode_batches": list(latency.decode_batches),
            "warmup": latency.warmup,
            "repeats": latency.repeats,
        },
    }


def write_json(result: EvalResult, path: Path) -> dict:
    document = to_json(result)
    _write_atomically(path, json.dumps(document, indent=2).encode())
    return document


VALUE_STEPS = ((1000, ",.0f"), (10, ".1f"), (0, ".3g"))
# A panel whose two bars differ by this factor or more gets a log scale (else the smaller bar vanishes).
LOG_SCALE_SPAN = 10.0


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (what the report and the plot title say the figures were measured on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "CPU"


def plot_figure(result: EvalResult):
    """One bar panel per figure (original vs compressed), each bar labelled with its value; a matplotlib Figure.

    Panels whose values span a decade or more use a log scale. The title names the checkpoint, the
    original, the text and the device, so a PNG on its own says what it shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figures = [row for row in rows(result) if row.compressed is not None]
    columns = 4
    lines = (len(figures) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 2.9 * lines + 0.6), squeeze=False)
    for axis, row in zip(axes.flat, figures):
        labels, values, colours = [], [], []
        if row.original is not None:
            labels.append("original"), values.append(row.original), colours.append("#7f7f7f")
        labels.append("compressed"), values.append(row.compressed), colours.append("#1f77b4")
        bars = axis.bar(labels, values, color=colours)
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(positive) / min(positive) >= LOG_SCALE_SPAN:
            axis.set_yscale("log")
        axis.bar_label(bars, labels=[value_label(v) for v in values], fontsize=7, padding=2)
        axis.margins(y=0.25)
        title = f"{row.name}" + (f" ({row.unit})" if row.unit else "")
        ratio_line = f"\nratio {format_ratio(row.ratio)}, {row.better} is better" if row.ratio is not None else ""
        axis.set_title(title + ratio_line, fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(figures):]:
        axis.axis("off")
    original = result.original.label if result.original is not None else "not measured"
    used = result.text
    fig.suptitle(
        f"{result.checkpoint.name} against the original ({original})\n"
        f"{result.metric} on {used['name']} ({used['tokens_used']:,} tokens); {device_name(result.device)}, "
        f"{str(result.dtype).removeprefix('torch.')}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def write_plot(result: EvalResult, path: Path) -> None:
    """``plot_figure`` saved as PNG (written beside, then moved into place). Needs matplotlib."""
    from matplotlib import pyplot as plt

    fig = plot_figure(result)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)


def value_label(value: float | None) -> str:
    """A figure as the table and the plot show it: 17.8, 120,877, 0.048 ('-' where not measured)."""
    return "-" if value is None else by_magnitude(value, VALUE_STEPS)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)
