"""What a conversion did, in numbers: per layer type and in total, for the table, model card and JSON.

Bits per weight always count both parts: the codes (M * columns * code bits) and the codebooks
(K * split dim * dtype bits), over the converted layers' weights. A tied head adds no bytes (it
reads its embedding's codes) and its weights are not counted twice.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from .convert import KIND_TIED_HEAD, LayerPlan, LayerResult

MB = 1e6


@dataclass
class TypeSummary:
    """All layers sharing one name pattern (layer numbers replaced by ``*``)."""

    pattern: str
    kind: str
    count: int
    num_codebooks: list[int]
    params: int
    dense_bytes: int
    code_bytes: int
    codebook_bytes: int
    error_mean: float
    error_worst: float

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
        """Mean relative reconstruction error over the converted layers (tied heads included)."""
        errors = [layer["rel_error"] for layer in self.layers]
        return sum(errors) / len(errors) if errors else 0.0

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
        )
        return data


def layer_pattern(name: str) -> str:
    """``model.layers.7.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and persistent buffer (what a checkpoint holds)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summarize(
    outcomes: list[LayerPlan | LayerResult],
    *,
    model_params: int,
    original_bytes: int,
    compressed_bytes: int,
    seconds: float,
) -> ConversionSummary:
    """Aggregate per-layer outcomes into per-type rows and totals."""
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
    )


def _type_summary(pattern: str, members: list[LayerResult]) -> TypeSummary:
    errors = [m.rel_error for m in members]
    counted = [m for m in members if m.plan.layer.kind != KIND_TIED_HEAD]
    return TypeSummary(
        pattern=pattern,
        kind=members[0].plan.layer.kind,
        count=len(members),
        num_codebooks=sorted({m.plan.num_codebooks for m in members}),
        params=sum(m.plan.layer.numel for m in counted),
        dense_bytes=sum(m.plan.layer.dense_bytes for m in counted),
        code_bytes=sum(m.plan.code_bytes for m in counted),
        codebook_bytes=sum(m.plan.codebook_bytes for m in counted),
        error_mean=sum(errors) / len(errors),
        error_worst=max(errors),
    )


def _layer_row(result: LayerResult) -> dict:
    plan = result.plan
    return {
        "name": plan.layer.name,
        "kind": plan.layer.kind,
        "shape": list(plan.layer.shape),
        "num_codebooks": plan.num_codebooks,
        "codebook_size": plan.codebook_size,
        "tied_to": plan.layer.tied_to,
        "code_bytes": plan.code_bytes,
        "codebook_bytes": plan.codebook_bytes,
        "dense_bytes": plan.layer.dense_bytes,
        "rel_error": result.rel_error,
        "iterations": result.iterations,
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


def table_rows(summary: ConversionSummary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-type table (shared by the Rich table and the model card)."""
    header = ["layer type", "n", "M", "params", "MB dense -> RPQ", "bpw = codes + codebooks", "rel. error mean / max"]
    labels = short_labels([t.pattern for t in summary.types])
    rows = []
    for t in summary.types:
        tied = t.kind == KIND_TIED_HEAD
        rows.append(
            [
                labels[t.pattern] + (" (tied)" if tied else ""),
                str(t.count),
                ",".join(map(str, t.num_codebooks)),
                "shared" if tied else f"{t.params / 1e6:.2f}M",
                "shared" if tied else f"{t.dense_bytes / MB:.1f} -> {(t.code_bytes + t.codebook_bytes) / MB:.1f}",
                "shared" if tied else f"{t.code_bits + t.codebook_bits:.2f} = {t.code_bits:.2f} + {t.codebook_bits:.2f}",
                f"{t.error_mean:.3f} / {t.error_worst:.3f}",
            ]
        )
    return header, rows


def totals_lines(summary: ConversionSummary) -> list[str]:
    """The few sentences under the table: sizes, bits per weight, what stayed dense."""
    lines = [
        f"converted {summary.converted_layers} layers ({summary.converted_params:,} of {summary.model_params:,} parameters), "
        f"left {len(summary.dense_layers)} dense",
        f"model size {summary.original_bytes / MB:.1f} MB -> {summary.compressed_bytes / MB:.1f} MB "
        f"({summary.ratio:.2f}x smaller)",
        f"converted layers: {summary.bits_per_weight:.3f} bits per weight "
        f"= {summary.code_bits:.3f} (codes) + {summary.codebook_bits:.3f} (codebooks)",
    ]
    reasons: dict[str, list[str]] = {}
    for name, reason in summary.dense_layers.items():
        reasons.setdefault(reason, []).append(name)
    for reason, names in reasons.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"dense ({reason}): {shown}")
    return lines
