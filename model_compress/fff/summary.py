"""What an FFF distillation did, in numbers: per block and in total, for the table, model card and JSON."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..core.cards import markdown_table
from ..core.sizes import size_lines
from .distill import BlockResult


@dataclass
class DistillSummary:
    blocks: list[BlockResult]
    model_params: int
    distilled_params: int
    original_bytes: int
    distilled_bytes: int
    calibration: dict
    seconds: float
    e2e_before: float | None = None
    e2e_after: float | None = None
    e2e_loss: str | None = None  # "KL(original || distilled) per token" or "1 - cosine of mean-pooled embeddings"
    warnings: list[str] = field(default_factory=list)
    input_file_bytes: int | None = None  # the input's weight files as the user gave them
    input_form: str | None = None  # "GGUF" or "weight files"
    output_file_bytes: int | None = None  # the written folder's weight files (set when it is saved)

    @property
    def error_mean(self) -> float:
        return sum(b.final_error for b in self.blocks) / len(self.blocks)

    @property
    def init_error_mean(self) -> float:
        return sum(b.init_error for b in self.blocks) / len(self.blocks)

    @property
    def neurons_per_token(self) -> float:
        return sum(b.neurons_per_token for b in self.blocks) / len(self.blocks)

    @classmethod
    def from_json(cls, data: dict) -> DistillSummary:
        """Back from compression_report.json (for `compress inspect`)."""
        names = {f.name for f in fields(BlockResult)}
        blocks = [BlockResult(**{k: v for k, v in b.items() if k in names}) for b in data["blocks"]]
        e2e = data.get("e2e") or {}
        return cls(
            blocks, data["model_params"], data["distilled_params"], data["original_bytes"], data["distilled_bytes"],
            data["calibration"], data["seconds"], e2e.get("before"), e2e.get("after"), e2e.get("loss"), data.get("warnings", []),
            data.get("input_file_bytes"), data.get("input_form"), data.get("output_file_bytes"),
        )

    def to_json(self) -> dict:
        return {
            "blocks": [b.to_json() for b in self.blocks],
            "model_params": self.model_params,
            "distilled_params": self.distilled_params,
            "original_bytes": self.original_bytes,
            "distilled_bytes": self.distilled_bytes,
            "calibration": self.calibration,
            "seconds": self.seconds,
            "error_mean": self.error_mean,
            "init_error_mean": self.init_error_mean,
            "neurons_per_token": self.neurons_per_token,
            "e2e": {"loss": self.e2e_loss, "before": self.e2e_before, "after": self.e2e_after},
            "warnings": list(self.warnings),
            "input_file_bytes": self.input_file_bytes,
            "input_form": self.input_form,
            "output_file_bytes": self.output_file_bytes,
        }


HEADER = ("block", "neurons", "tree", "neurons/token", "error at init", "error", "busiest leaf", "seconds")


def _tree_shape(block: BlockResult) -> str:
    """'depth 3: 96 + 8 x 168, top 2': the shared part, the leaves and how many a token runs."""
    shared = f"{block.shared_width} + " if block.shared_width else ""
    top = f", top {block.leaves_per_token}" if block.leaves_per_token > 1 else ""
    return f"depth {block.depth}: {shared}{2**block.depth} x {block.leaf_width}{top}"


def table_rows(summary: DistillSummary) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """One row per block: shape, share of neurons a token uses, held-out relative error before / after training."""
    rows = [
        (
            b.name,
            str(b.neurons),
            _tree_shape(b),
            f"{b.neurons_per_token:.1%}",
            f"{b.init_error:.3f}",
            f"{b.final_error:.3f}",
            f"{b.busiest_leaf:.0%}",
            f"{b.seconds:.1f}",
        )
        for b in summary.blocks
    ]
    return HEADER, rows


def totals_lines(summary: DistillSummary) -> list[str]:
    lines = [
        f"{len(summary.blocks)} FF blocks became trees; mean held-out relative error {summary.error_mean:.3f} "
        f"(at initialisation {summary.init_error_mean:.3f}); a token evaluates {summary.neurons_per_token:.1%} of each block's neurons",
        f"parameters {summary.model_params:,} -> {summary.distilled_params:,}",
        f"calibration: {summary.calibration['tokens']:,} tokens of {summary.calibration['name']} "
        f"({summary.calibration['holdout']:.0%} held out for the errors)",
    ]
    lines[2:2] = size_lines(
        summary.original_bytes, summary.distilled_bytes, summary.input_file_bytes, summary.output_file_bytes, summary.input_form
    )
    if summary.e2e_loss is not None:
        lines.append(f"end-to-end distillation: {summary.e2e_loss} on held-out windows {summary.e2e_before:.4f} -> {summary.e2e_after:.4f}")
    return lines


def render_model_card(label: str, settings: dict, summary: DistillSummary) -> str:
    """The checkpoint's README.md: base model, settings, how to load, the per-block table."""
    table = markdown_table(*table_rows(summary))
    knobs = ", ".join(f"`{key}` {value}" for key, value in settings.items())
    return "\n".join(
        [
            "---",
            "tags: [model-compress, fff, fast-feedforward, distillation]",
            "---",
            "",
            f"# Fast FeedForward version of {label}",
            "",
            "Each converted FF block is a binary tree of router neurons over small FF leaves; at inference a token",
            "descends the tree and runs one leaf (Belcak & Wattenhofer, Fast Feedforward Networks, 2023).",
            "",
            "## Settings",
            knobs,
            "",
            "## Load",
            "```python",
            "import model_compress",
            "model = model_compress.load('path/to/this/folder')",
            "```",
            "",
            "## Distillation (measured)",
            "Error is ||tree(x) - block(x)|| / ||block(x)|| with hard routing, on held-out calibration tokens.",
            "",
            *table,
            "",
            *[f"- {line}" for line in totals_lines(summary)],
            "",
        ]
    )
