"""`compress eval` as one call: measure a compressed checkpoint and its original side by side.

Same text, same device, same dtype, same timing method, one model on the device at a time: the
original is loaded, measured and freed, then the compressed model. The original is the one
`compress rpq` recorded in the checkpoint's config (``base_model``) unless the caller names another;
when it cannot be loaded, the compressed model is still measured and the report says why the
original is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import transformers
from torch import nn

from ..core import methods
from ..core.checkpoint import REPORT_FILE, decoded_dtype, load, validate_checkpoint, weight_files
from ..core.text import Text
from ..core.errors import UserError
from ..core.sources import context_length, disk_bytes, load_model, load_tokenizer, original_source
from ..core.sizes import model_bytes, model_params
from ..core.spread_launch import require_gpus
from . import perplexity, similarity
from .latency import LatencyResult, LatencySettings, PeakMemory, measure, release_device_memory
from .placement import Placement, model_devices

METRICS = ("auto", "perplexity", "mlm", "embedding")
DEFAULT_SEQ_LEN = 2048


@dataclass
class EvalSettings:
    device: torch.device
    dtype: torch.dtype | None = None  # None: float16 / the checkpoint's half dtype on CUDA, float32 on a CPU
    seq_len: int | None = None  # None: min(2048, the model's context)
    max_tokens: int | None = None
    batch_size: int = 1
    metric: str = "auto"
    seed: int = 0
    latency: LatencySettings | None = field(default_factory=LatencySettings)
    decode_weights: bool = False  # the compressed layers keep their weights decoded in 16 bits (load's option)
    gpus: int = 1  # more: each model spread over this many GPUs from ``device`` on (placement.py)


class EvalObserver(Protocol):
    def stage(self, description: str, total: int | None) -> None: ...
    def advance(self, amount: int = 1) -> None: ...


class SilentObserver:
    def stage(self, description: str, total: int | None) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass


@dataclass
class Measurement:
    """Everything measured on one model."""

    role: str
    label: str
    model_class: str
    params: int
    weight_bytes: int
    disk_bytes: int | None
    load_seconds: float
    quality: dict = field(default_factory=dict)
    latency: LatencyResult | None = None
    decoded_bytes: int = 0  # weights kept decoded beside the codes (--decode-weights), part of weight_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.params

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "model_class": self.model_class,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "decoded_bytes": self.decoded_bytes,
            "bits_per_weight": self.bits_per_weight,
            "disk_bytes": self.disk_bytes,
            "load_seconds": self.load_seconds,
            "quality": self.quality,
            "latency": self.latency.to_json() if self.latency else None,
        }


@dataclass
class EvalResult:
    checkpoint: Path
    metric: str
    dtype: torch.dtype
    device: torch.device
    text: dict
    compressed: Measurement
    original: Measurement | None
    original_error: str | None
    compression: dict
    warnings: list[str]
    settings: EvalSettings | None = None


def evaluate(
    checkpoint: str | Path,
    text: Text,
    settings: EvalSettings,
    baseline: str | None = None,
    use_baseline: bool = True,
    observer: EvalObserver | None = None,
) -> EvalResult:
    """Measure ``checkpoint`` and (unless ``use_baseline`` is False) its original on ``text``."""
    checkpoint = Path(checkpoint)
    observer = observer or SilentObserver()
    if settings.metric not in METRICS:
        raise UserError(f"unknown --metric '{settings.metric}'; choose {', '.join(METRICS)}")
    if settings.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {settings.batch_size})")
    if settings.max_tokens is not None and settings.max_tokens < 1:
        raise UserError(f"--max-tokens must be positive (got {settings.max_tokens})")
    timing = settings.latency
    if timing is not None and (timing.repeats < 1 or timing.prompt_len < 1 or timing.new_tokens < 2 or min(timing.decode_batches, default=0) < 1):
        raise UserError("--repeats and --prompt-len must be at least 1, --new-tokens at least 2, --decode-batch sizes positive")
    placement = _placement(settings)
    section = validate_checkpoint(checkpoint)
    tokenizer = load_tokenizer(str(checkpoint))
    if tokenizer is None:
        raise UserError(f"'{checkpoint}' holds no tokenizer: the text cannot be tokenized for this model")
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    dtype = settings.dtype or _auto_dtype(config, settings.device)
    warnings: list[str] = []

    observer.stage("loading the compressed model", None)
    # On the CPU for now: the original is measured first, with the device to itself.
    compressed_model, load_seconds = _timed(lambda: load(checkpoint, dtype=dtype))
    decoded_bytes = methods.decode_weights(compressed_model, decoded_dtype(compressed_model)) if settings.decode_weights else 0
    metric = choose_metric(compressed_model, settings.metric, use_baseline)
    seq_len = _sequence_length(settings.seq_len, config, metric)
    inputs = _Inputs(metric, text, seq_len, settings)
    inputs.prepare(tokenizer)

    original, original_error = None, None
    if use_baseline:
        try:
            original = _measure_original(section, baseline, inputs, settings, dtype, observer, placement)
        except UserError as error:
            original_error = str(error)
            warnings.append(f"the original could not be measured ({error}); pass --no-baseline to skip it")
    compressed = Measurement(
        "compressed", str(checkpoint), type(compressed_model).__name__, _original_params(checkpoint, section),
        model_bytes(compressed_model) + decoded_bytes, sum(f.stat().st_size for f in weight_files(checkpoint)), load_seconds,
        decoded_bytes=decoded_bytes,
    )
    if decoded_bytes:
        warnings.append(f"--decode-weights: the compressed layers keep their weights decoded ({decoded_bytes / 1e6:,.1f} MB, "
                        "counted in its weights in memory) beside the codes")
    _measure_into(compressed, placement.place(compressed_model), inputs, settings, observer)
    if metric == "embedding" and original is not None:
        compressed.quality.update(similarity.compare(inputs.reference, inputs.outputs))
    warnings += inputs.notes
    warnings += _decode_failures(original, compressed)
    if settings.device.type == "cpu" and settings.latency is not None:
        warnings.append("CPU timings are wall-clock and indicative only; measure speed with --device cuda")
    return EvalResult(
        checkpoint, metric, dtype, settings.device, inputs.describe(), compressed, original, original_error,
        section, warnings, settings,
    )


def _decode_failures(*measurements: Measurement | None) -> list[str]:
    """One line per graphed prefill or decode measurement that could not run (a CUDA graph capture, a compile), with
    its reason."""
    lines = []
    for measurement in measurements:
        latency = None if measurement is None else measurement.latency
        if latency is None:
            continue
        if latency.prefill_graphed_error:
            lines.append(f"the {measurement.role} model's prefill from a CUDA graph did not run: {latency.prefill_graphed_error}")
        for kind, errors in (("from a CUDA graph", latency.graph_decode_errors), ("compiled", latency.compiled_decode_errors)):
            lines += [f"the {measurement.role} model's decode {kind} at batch {batch} did not run: {error}"
                      for batch, error in errors.items()]
    return lines


def choose_metric(model: nn.Module, requested: str, use_baseline: bool) -> str:
    """perplexity for causal LMs, mlm for masked-LM heads, embedding for bare encoders."""
    kind = type(model).__name__
    if _can_generate(model):
        available = "perplexity"
    elif _has_mlm_head(model):
        available = "mlm"
    else:
        available = "embedding"
    names = {"perplexity": "perplexity", "mlm": "masked-LM loss", "embedding": "embedding similarity to the original"}
    if requested not in ("auto", available):
        raise UserError(
            f"{kind} has no {'causal LM' if requested == 'perplexity' else 'masked-LM'} head, so {names[requested]} "
            f"cannot be measured; --metric auto measures {names[available]} instead"
        )
    if available == "embedding" and not use_baseline:
        raise UserError(f"{kind} has no LM head: its quality is measured against the original, which --no-baseline skips")
    return available


def _can_generate(model: nn.Module) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)())


def _has_mlm_head(model: nn.Module) -> bool:
    try:
        return isinstance(model, transformers.MODEL_FOR_MASKED_LM_MAPPING[type(model.config)])
    except KeyError:
        return False


def _auto_dtype(config, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if str(saved).endswith("bfloat16") else torch.float16


def _sequence_length(requested: int | None, config, metric: str) -> int:
    context = context_length(config)
    if requested is None:
        return min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
    if context is not None and requested > context:
        raise UserError(f"--seq-len {requested} is longer than the model's context ({context} tokens)")
    return requested


class _Inputs:
    """The tokenized text in the form the metric needs, built once and given to both models."""

    def __init__(self, metric: str, text: Text, seq_len: int, settings: EvalSettings) -> None:
        self.metric, self.text, self.seq_len, self.settings = metric, text, seq_len, settings
        self.total_tokens = 0
        self.notes: list[str] = []
        self.reference: similarity.EmbeddingOutputs | None = None
        self.outputs: similarity.EmbeddingOutputs | None = None

    def prepare(self, tokenizer) -> None:
        """Tokenize the whole text once (latency prompts come from it too), then cut it for the metric."""
        joined, settings = self.text.joined, self.settings
        self.ids = perplexity.tokenize(tokenizer, joined)
        self.total_tokens = self.ids.numel()
        if self.metric == "embedding":
            self.batches = similarity.sentence_batches(tokenizer, joined, self.seq_len, settings.max_tokens, settings.batch_size)
        elif self.metric == "mlm":
            self.masked = perplexity.masked_windows(tokenizer, self.ids, self.seq_len, settings.max_tokens, settings.seed)
        else:
            self.windows = perplexity.cut_windows(self.ids, self.seq_len, settings.max_tokens)

    @property
    def count(self) -> int:
        if self.metric == "embedding":
            return self.batches.sentences
        return (self.masked.input_ids if self.metric == "mlm" else self.windows).shape[0]

    def describe(self) -> dict:
        described = {**self.text.to_json(), "tokens_in_text": self.total_tokens, "max_tokens": self.settings.max_tokens}
        if self.metric == "embedding":
            return {**described, "sentences": self.batches.sentences, "tokens_used": self.batches.tokens, "max_length": self.seq_len}
        if self.metric == "mlm":  # every window is framed by [CLS] ... [SEP]
            count = self.masked.input_ids.shape[0]
            return {**described, "windows": count, "seq_len": self.seq_len, "tokens_used": count * (self.seq_len - 2)}
        return {**described, "windows": self.windows.shape[0], "seq_len": self.seq_len, "tokens_used": self.windows.numel()}


def _placement(settings: EvalSettings) -> Placement:
    """Where both models go; one clear line for a ``--gpus`` this machine cannot give."""
    if settings.gpus < 1:
        raise UserError(f"--gpus {settings.gpus}: give 1 or more")
    if settings.gpus > 1:
        if settings.device.type != "cuda":
            raise UserError(f"--gpus {settings.gpus} spreads a model over GPUs: pass --device cuda")
        require_gpus(settings.gpus, settings.device.index or 0)
    return Placement(settings.device, settings.gpus)


def _measure_original(section: dict, override: str | None, inputs: _Inputs, settings: EvalSettings, dtype, observer,
                      placement: Placement) -> Measurement:
    source = original_source(section, override)
    observer.stage(f"loading the original ({source.label})", None)
    (model, tokenizer), seconds = _timed(lambda: load_model(source, dtype))
    if tokenizer is not None:
        ids = perplexity.tokenize(tokenizer, inputs.text.joined)
        if not torch.equal(ids, inputs.ids):
            raise UserError(
                f"'{source.label}' tokenizes the text differently from the checkpoint, so their perplexities would not compare"
            )
    if source.gguf_file:
        inputs.notes.append(
            f"the original's size on disk is its GGUF file (already quantized); it runs dequantized to {str(dtype).removeprefix('torch.')}"
        )
    measurement = Measurement(
        "original", source.label, type(model).__name__, model_params(model), model_bytes(model), disk_bytes(source), seconds,
    )
    model = placement.place(model)
    devices = model_devices(model)
    _measure_into(measurement, model, inputs, settings, observer)
    if inputs.metric == "embedding":
        inputs.reference, inputs.outputs = inputs.outputs, None
    del model
    for device in devices:
        release_device_memory(device)
    return measurement


def _measure_into(target: Measurement, model: nn.Module, inputs: _Inputs, settings: EvalSettings, observer) -> None:
    """Quality, then latency and memory, of ``model`` (already on the device)."""
    role = target.role
    observer.stage(f"{role}: {_metric_label(inputs.metric)}", inputs.count)
    methods.full_logits(model, True)  # a head with an index: perplexity needs every logit
    with PeakMemory(settings.device, model_devices(model)) as peak:
        if inputs.metric == "perplexity":
            result = perplexity.causal_nll(model, inputs.windows, settings.batch_size, observer.advance)
        elif inputs.metric == "mlm":
            result = perplexity.masked_nll(model, inputs.masked, settings.batch_size, observer.advance)
        else:
            inputs.outputs = similarity.embed(model, inputs.batches, observer.advance)
            result = None
    if result is not None:
        target.quality = {"nll_mean": result.mean, "tokens_scored": result.tokens}
        key = "perplexity" if inputs.metric == "perplexity" else "mlm_perplexity"
        target.quality[key] = result.perplexity
    target.quality["peak_memory_bytes"] = peak.peak
    methods.full_logits(model, False)  # decoding answers from the index, as a user's model does
    if inputs.metric == "perplexity":
        target.quality.update(methods.head_figures(model, inputs.windows, settings.device))
    if settings.latency is not None:
        generates = _can_generate(model)
        observer.stage(f"{role}: latency", 1 + (len(settings.latency.decode_batches) if generates else 0))
        target.latency = measure(model, inputs.ids, settings.latency, generates, lambda name: observer.advance())


def _metric_label(metric: str) -> str:
    return {"perplexity": "perplexity", "mlm": "masked-LM loss", "embedding": "embeddings"}[metric]


def _original_params(checkpoint: Path, section: dict) -> int:
    """The original's parameter count, as `compress rpq` recorded it (the compressed model has fewer tensors)."""
    report = checkpoint / REPORT_FILE
    if report.is_file():
        return json.loads(report.read_text())["summary"]["model_params"]
    raise UserError(f"'{checkpoint}' has no {REPORT_FILE}: the checkpoint is incomplete")


def _timed(call: Callable):
    began = time.perf_counter()
    value = call()
    return value, time.perf_counter() - began


