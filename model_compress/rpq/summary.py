"""What a conversion did, in numbers: per layer type and in total, for the table, model card and JSON.

Bits per weight always count everything stored: the codes (packed at ceil(log2 K) bits), the
codebooks (K * split dim values) and the int8 codebooks' scales, over the converted layers'
weights. A tied head adds no bytes (it reads its embedding's codes) and its weights are not
counted twice. Two errors per layer: ||W - W_hat|| / ||W|| (weight) and, where calibration data
reached the layer, tr(dW H dW^T) / tr(W H W^T) (output: what the fit minimises).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from collections import Counter

from ..core.sizes import MB, size_lines
from .layers.modules import KIND_TIED_HEAD
from .outcomes import LayerResult
from .plan import LayerPlan
from .kernels.config.packed_routes import byte_permute_format
from .kernels.layout import INT8, code_bits
from .layers.modules import KIND_CONV1D, KIND_LINEAR

# Mean relative output error (per layer) above which the summary warns of a large loss. SmolLM2-135M
# averaged 0.004 at 4.5 bits (perplexity 1.18x its original's before fine-tuning, benchmarks/RESULTS.md)
# and 0.014 at 3.25 bits (1.85x on the GPU, 1.99x with the CPU defaults): 0.01 lies between the two.
HIGH_OUTPUT_ERROR = 0.01
HIGH_WEIGHT_ERROR = 0.2  # the same warning when no calibration data measured the output error


@dataclass
class TypeSummary:
    """All layers sharing one name pattern (layer numbers replaced by ``*``)."""

    pattern: str
    kind: str
    count: int
    formats: list[str]
    params: int
    dense_bytes: int
    code_bytes: int
    codebook_bytes: int
    error_mean: float
    error_worst: float
    output_error_mean: float | None = None
    output_error_worst: float | None = None
    rotations: list[str] = field(default_factory=list)  # "H64" (a Hadamard block of 64) or "none", each distinct one
    estimated_kl: float | None = None  # sum over the type's layers of the KL their output errors predict

    @property
    def code_bits(self) -> float:
        return 8 * self.code_bytes / self.params if self.params else 0.0

    @property
    def codebook_bits(self) -> float:
        return 8 * self.codebook_bytes / self.params if self.params else 0.0


@dataclass
class ConversionSummary:
    types: list[TypeSummary]
    dense_layers: dict[str, str]
    converted_layers: int
    model_params: int
    original_bytes: int
    compressed_bytes: int
    converted_params: int
    code_bytes: int
    codebook_bytes: int
    seconds: float
    layers: list[dict] = field(default_factory=list)
    budget_bits: float | None = None
    calibration: dict | None = None
    finetune: dict | None = None
    input_file_bytes: int | None = None  # the input's weight files as the user gave them (a GGUF is its quantized size)
    input_form: str | None = None  # "GGUF" or "weight files": how the input was stored
    output_file_bytes: int | None = None  # the written folder's weight files (set when it is saved)

    @property
    def code_bits(self) -> float:
        return 8 * self.code_bytes / self.converted_params

    @property
    def codebook_bits(self) -> float:
        return 8 * self.codebook_bytes / self.converted_params

    @property
    def bits_per_weight(self) -> float:
        return self.code_bits + self.codebook_bits

    @property
    def error_mean(self) -> float:
        """Mean relative weight error over the converted layers (tied heads included)."""
        errors = [layer["weight_error"] for layer in self.layers]
        return sum(errors) / len(errors) if errors else 0.0

    @property
    def output_error_mean(self) -> float | None:
        """Mean relative output error over the layers calibration data reached (None: no data)."""
        errors = [layer["output_error"] for layer in self.layers if layer.get("output_error") is not None]
        return sum(errors) / len(errors) if errors else None

    @property
    def estimated_kl(self) -> float | None:
        """The KL to the original the layers' output errors predict, summed (None where nothing was weighed)."""
        known = [t.estimated_kl for t in self.types if t.estimated_kl is not None]
        return sum(known) if known else None

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes

    @classmethod
    def from_json(cls, data: dict) -> "ConversionSummary":
        """Rebuild from ``to_json()`` output (the figures derived on the way out are recomputed)."""
        names = {f.name for f in fields(cls)}
        type_names = {f.name for f in fields(TypeSummary)}
        values = {key: value for key, value in data.items() if key in names}
        values["types"] = [TypeSummary(**{k: v for k, v in t.items() if k in type_names}) for t in data["types"]]
        return cls(**values)

    def to_json(self) -> dict:
        """Every figure, per type and per layer, for compression_report.json."""
        data = asdict(self)
        data["types"] = [
            {**asdict(t), "code_bits_per_weight": t.code_bits, "codebook_bits_per_weight": t.codebook_bits}
            for t in self.types
        ]
        data.update(
            code_bits_per_weight=self.code_bits,
            codebook_bits_per_weight=self.codebook_bits,
            bits_per_weight=self.bits_per_weight,
            size_ratio=self.ratio,
            weight_error_mean=self.error_mean,
            output_error_mean=self.output_error_mean,
            estimated_kl=self.estimated_kl,
        )
        return data


def layer_pattern(name: str) -> str:
    """``model.layers.7.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def rotation_label(plan: LayerPlan) -> str:
    """``H64`` for a Hadamard input rotation of blocks of 64, ``none`` for an unrotated layer."""
    return "none" if plan.rotation_block is None else f"H{plan.rotation_block}"


def format_label(plan: LayerPlan) -> str:
    """``D=1 K=16 int8``: weights per code, codes per codebook, codebook storage."""
    fmt = plan.format
    piece = fmt.piece(plan.layer.shape, plan.layer.layout)
    return f"D={piece} K={fmt.codebook_size} {fmt.codebook_dtype}"


def kernel_line(layers: list[dict]) -> str | None:
    """Which GPU kernels the converted Linear layers run on with fp16 inputs: a format without a fast kernel (a low
    budget's 3-bit tables, ``--any-format``) is named here, not found later as a slow model."""
    linear = [row for row in layers if row["kind"] in (KIND_LINEAR, KIND_CONV1D)]
    if not linear:
        return None
    slow = Counter(f"D={row['piece']} K={row['codebook_size']} {row['codebook_dtype']}" for row in linear if not _has_fast_kernel(row))
    line = f"GPU kernels (fp16): {len(linear) - sum(slow.values())} of {len(linear)} Linear layers in formats with fast kernels"
    if slow:
        line += "; " + ", ".join(f"{count} in {label}" for label, count in slow.most_common()) + " take the general kernels (slower)"
    return line


def _has_fast_kernel(row: dict) -> bool:
    """The byte-permute kernels' formats, or rpq-pytorch's (8-bit codes, float codebooks, no rotation), which has its own."""
    rpq_pytorch = code_bits(row["codebook_size"]) == 8 and row["codebook_dtype"] != INT8 and row["rotation_block"] is None
    return rpq_pytorch or byte_permute_format(row["piece"], row["codebook_size"], row["codebook_dtype"], row["shape"][1])


def summarize(
    outcomes: list[LayerPlan | LayerResult],
    *,
    model_params: int,
    original_bytes: int,
    compressed_bytes: int,
    seconds: float,
    **extra,
) -> ConversionSummary:
    """Aggregate per-layer outcomes into per-type rows and totals (``extra``: budget, calibration, finetune)."""
    results = [o for o in outcomes if isinstance(o, LayerResult)]
    dense = {o.layer.name: o.dense_reason for o in outcomes if isinstance(o, LayerPlan)}
    groups: dict[str, list[LayerResult]] = {}
    for result in results:
        groups.setdefault(layer_pattern(result.plan.layer.name), []).append(result)
    types = [_type_summary(pattern, members) for pattern, members in groups.items()]
    weighted = [r for r in results if r.plan.layer.kind != KIND_TIED_HEAD]
    return ConversionSummary(
        types=types,
        dense_layers=dense,
        converted_layers=len(results),
        model_params=model_params,
        original_bytes=original_bytes,
        compressed_bytes=compressed_bytes,
        converted_params=sum(r.plan.layer.numel for r in weighted),
        code_bytes=sum(r.plan.code_bytes for r in weighted),
        codebook_bytes=sum(r.plan.codebook_bytes for r in weighted),
        seconds=seconds,
        layers=[_layer_row(r) for r in results],
        **extra,
    )


def _type_summary(pattern: str, members: list[LayerResult]) -> TypeSummary:
    errors = [m.weight_error for m in members]
    outputs = [m.output_error for m in members if m.output_error is not None]
    counted = [m for m in members if m.plan.layer.kind != KIND_TIED_HEAD]
    return TypeSummary(
        pattern=pattern,
        kind=members[0].plan.layer.kind,
        count=len(members),
        formats=sorted({format_label(m.plan) for m in members}),
        params=sum(m.plan.layer.numel for m in counted),
        dense_bytes=sum(m.plan.layer.dense_bytes for m in counted),
        code_bytes=sum(m.plan.code_bytes for m in counted),
        codebook_bytes=sum(m.plan.codebook_bytes for m in counted),
        error_mean=sum(errors) / len(errors),
        error_worst=max(errors),
        output_error_mean=sum(outputs) / len(outputs) if outputs else None,
        output_error_worst=max(outputs) if outputs else None,
        rotations=sorted({rotation_label(m.plan) for m in members}),
        estimated_kl=sum(estimates) if (estimates := [m.estimated_kl for m in members if m.estimated_kl is not None]) else None,
    )


def _layer_row(result: LayerResult) -> dict:
    plan = result.plan
    layer = plan.layer
    tied = layer.kind == KIND_TIED_HEAD
    return {
        "name": layer.name,
        "kind": layer.kind,
        "shape": list(layer.shape),
        "num_codebooks": plan.num_codebooks,
        "piece": plan.format.piece(layer.shape, layer.layout),
        "codebook_size": plan.codebook_size,
        "codebook_dtype": plan.codebook_dtype,
        "rotation_block": plan.rotation_block,
        "tied_to": layer.tied_to,
        "code_bytes": plan.code_bytes,
        "codebook_bytes": plan.codebook_bytes,
        "dense_bytes": layer.dense_bytes,
        "bits_per_weight": None if tied else 8 * (plan.code_bytes + plan.codebook_bytes) / layer.numel,
        "weight_error": result.weight_error,
        "output_error": result.output_error,
        "loss_weight": result.loss_weight,
        "estimated_kl": result.estimated_kl,
        "rounds": result.rounds,
        "seconds": result.seconds,
    }


def short_labels(patterns: list[str]) -> dict[str, str]:
    """Each pattern's shortest dotted suffix that no other pattern ends with (``self_attn.q_proj``)."""
    labels = {}
    for pattern in patterns:
        parts = pattern.split(".")
        for take in range(1, len(parts) + 1):
            suffix = ".".join(parts[-take:])
            if not any(other != pattern and (other == suffix or other.endswith("." + suffix)) for other in patterns):
                break
        labels[pattern] = suffix
    return labels


def _errors(mean: float | None, worst: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} / {worst:.4f}"


def table_rows(summary: ConversionSummary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-type table (shared by the Rich table and the model card)."""
    header = [
        "layer type", "n", "format", "rotation", "params", "MB dense -> RPQ", "bpw = codes + codebooks", "weight err mean / max",
        "output err mean / max", "est. loss",
    ]
    labels = short_labels([t.pattern for t in summary.types])
    rows = []
    for t in summary.types:
        tied = t.kind == KIND_TIED_HEAD
        rows.append(
            [
                labels[t.pattern] + (" (tied)" if tied else ""),
                str(t.count),
                ", ".join(t.formats),
                ", ".join(t.rotations) or "none",
                "shared" if tied else f"{t.params / 1e6:.2f}M",
                "shared" if tied else f"{t.dense_bytes / MB:.1f} -> {(t.code_bytes + t.codebook_bytes) / MB:.1f}",
                "shared" if tied else f"{t.code_bits + t.codebook_bits:.2f} = {t.code_bits:.2f} + {t.codebook_bits:.2f}",
                f"{t.error_mean:.3f} / {t.error_worst:.3f}",
                _errors(t.output_error_mean, t.output_error_worst),
                "-" if t.estimated_kl is None else f"{t.estimated_kl:.4f}",
            ]
        )
    return header, rows


def totals_lines(summary: ConversionSummary) -> list[str]:
    """The few sentences under the table: sizes, bits per weight, calibration, fine-tuning, what stayed dense."""
    lines = [
        f"converted {summary.converted_layers} layers ({summary.converted_params:,} of {summary.model_params:,} parameters), "
        f"left {len(summary.dense_layers)} dense",
        f"converted layers: {summary.bits_per_weight:.3f} bits per weight "
        f"= {summary.code_bits:.3f} (codes) + {summary.codebook_bits:.3f} (codebooks)"
        + (f", budget {summary.budget_bits:g}" if summary.budget_bits is not None else ""),
    ]
    lines[1:1] = size_lines(
        summary.original_bytes, summary.compressed_bytes, summary.input_file_bytes, summary.output_file_bytes, summary.input_form
    )
    kernels = kernel_line(summary.layers)
    if kernels:
        lines.append(kernels)
    if summary.calibration:
        c = summary.calibration
        lines.append(
            f"calibration: {c['fit_tokens']:,} tokens of {c['text']} ({c['fit_windows']} windows of {c['seq_len']})"
            + (f", {c['held_out_tokens']:,} more held out for fine-tuning" if c["held_out_tokens"] else "")
        )
    else:
        lines.append("calibration: none (codebooks fitted to the weights alone)")
    if summary.estimated_kl is not None:
        lines.append(
            f"est. loss: {summary.estimated_kl:.4f}, what the layers' output errors predict, each weighed by the Fisher "
            "information of the model's output and summed (KL to the original in nats per token with a language-model "
            "head, 1 - cosine of the pooled embedding without)"
        )
    if summary.finetune and summary.finetune.get("steps"):
        f = summary.finetune
        lines.append(
            f"fine-tuning: {f['steps']} steps, held-out KL to the original {f['held_out_kl_before']:.4f} -> "
            f"{f['held_out_kl_after']:.4f}" + (" (kept the fit before fine-tuning: it was better)" if f.get("reverted") else "")
            + _checkpointing_note(f.get("activation_checkpointing"))
        )
    reasons: dict[str, list[str]] = {}
    for name, reason in summary.dense_layers.items():
        reasons.setdefault(reason, []).append(name)
    for reason, names in reasons.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"dense ({reason}): {shown}")
    return lines


def _checkpointing_note(choice: dict | None) -> str:
    """Where the blocks were checkpointed while fine-tuning: why (the estimate against the free memory)."""
    if not choice or not choice.get("checkpointed"):
        return ""
    return (f"; blocks recomputed in the backward pass (activation checkpointing): one step's activations were estimated "
            f"at {choice['estimate_bytes'] / 2**30:.1f} GiB with {choice['free_bytes'] / 2**30:.1f} GiB free")
