"""The README.md model card of an RPQ checkpoint: where it came from, the settings, the measured table."""

from __future__ import annotations

from .hf_integration import RPQConfig
from .summary import ConversionSummary, table_rows, totals_lines


def markdown_table(header, rows) -> list[str]:
    """A Markdown table's lines: header, separator, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def render_model_card(config: RPQConfig, summary: ConversionSummary) -> str:
    """Markdown: base model, settings, how to load, the per-type table and totals."""
    table = markdown_table(*table_rows(summary))
    fit = config.fit
    settings = [
        f"- base model: `{config.base_model.get('label', 'unknown')}`",
        "- method: reverse product quantization (RPQ), layout of rpq-pytorch 0.0.2",
        f"- `--codebooks` (M): {config.num_codebooks}; `--codebook-size` (K): {config.codebook_size}",
        f"- `--skip`: {', '.join(f'`{p}`' for p in config.skip) or 'none'}",
        f"- k-means: seed {fit.get('seed')}, at most {fit.get('max_iter')} iterations, tolerance {fit.get('tol')}, "
        f"fitted on {fit.get('device')} in {summary.seconds:.1f} s",
        f"- dtype: {fit.get('dtype')}; tool: {config.tool.get('name')} {config.tool.get('version')}",
    ]
    return "\n".join(
        [
            "---",
            "tags: [model-compress, rpq, quantization]",
            "---",
            "",
            f"# RPQ-compressed {config.base_model.get('label', 'model')}",
            "",
            "Every converted layer stores `codebooks` (M, K, D) and `indices` (M, columns) instead of its weight.",
            "",
            "## Settings",
            *settings,
            "",
            "## Load",
            "```python",
            "import model_compress",
            "model = model_compress.load('path/to/this/folder')",
            "# or, after `import model_compress`: transformers.AutoModelForCausalLM.from_pretrained(...)",
            "```",
            "",
            "## Conversion (measured)",
            "Relative error is ||W - W_hat|| / ||W|| per layer; bpw counts codes and codebooks.",
            "",
            *table,
            "",
            *[f"- {line}" for line in totals_lines(summary)],
            "",
        ]
    )
