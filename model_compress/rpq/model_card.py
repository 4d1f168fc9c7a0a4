"""The README.md model card of an RPQ checkpoint: where it came from, the settings, the measured table."""

from __future__ import annotations

from ..core.cards import markdown_table
from .quantizer import RPQConfig
from .summary import ConversionSummary, table_rows, totals_lines


def settings_line(config: RPQConfig) -> str:
    """The format settings as the user gave them: a budget, or fixed M / K."""
    codebooks = {8: "int8 + one scale per codebook", 16: "16-bit"}.get(config.codebook_bits, "chosen per layer")
    if config.bits is not None:
        return f"`--bits {config.bits:g}` (format chosen per layer from measured errors); codebooks: {codebooks}"
    return f"fixed for every layer: `--codebooks` (M) {config.num_codebooks}, `--codebook-size` (K) {config.codebook_size}"


def rotation_line(config: RPQConfig) -> str:
    """What the rotation setting was and where it applied (the table's rotation column says per layer type)."""
    if config.rotation in (None, "none"):
        return "none"
    rotated = sum(1 for spec in config.layers.values() if spec.get("rotation_block"))
    return (
        f"Hadamard (random signs times blocks of up to {config.rotation_block}); {rotated} of {len(config.layers)} layers "
        "store W R and compute with x R"
    )


def render_model_card(config: RPQConfig, summary: ConversionSummary) -> str:
    """Markdown: base model, settings, how to load, the per-type table, totals and the fine-tuning curve."""
    table = markdown_table(*table_rows(summary))
    fit = config.fit
    settings = [
        f"- base model: `{config.base_model.get('label', 'unknown')}`",
        "- method: reverse product quantization (RPQ), layout of rpq-pytorch 0.0.2 (codes packed at ceil(log2 K) bits)",
        f"- format: {settings_line(config)}",
        f"- input rotation: {rotation_line(config)}",
        f"- `--skip`: {', '.join(f'`{p}`' for p in config.skip) or 'none'}",
        f"- fitting: {fit.get('algorithm')}; at most {fit.get('rounds')} round{'' if fit.get('rounds') == 1 else 's'} of sweep + refit, seed {fit.get('seed')}, "
        f"on {fit.get('device')} in {summary.seconds:.1f} s",
        f"- dtype: {fit.get('dtype')}; tool: {config.tool.get('name')} {config.tool.get('version')}",
    ]
    curve = []
    if summary.finetune and summary.finetune.get("steps"):
        points = summary.finetune["curve"]
        curve = [
            "",
            "## Fine-tuning (measured)",
            "Codebooks, norms and biases trained on KL to the original's next-token distributions (codes fixed); "
            "held-out calibration loss by step:",
            "",
            *markdown_table(
                ["step", "train loss", "held-out loss"],
                [[str(p["step"]), f"{p['train']:.4f}" if "train" in p else "-", f"{p['held_out']:.4f}"] for p in points],
            ),
        ]
    return "\n".join(
        [
            "---",
            "tags: [model-compress, rpq, quantization]",
            "---",
            "",
            f"# RPQ-compressed {config.base_model.get('label', 'model')}",
            "",
            "Every converted layer stores `codebooks` (M, K, D) and packed `indices` (codes) instead of its weight.",
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
            "Weight error is ||W - W_hat|| / ||W|| per layer; output error is tr(dW H dW^T) / tr(W H W^T) on the "
            "calibration inputs (what the fit minimises); bpw counts codes, codebooks and scales.",
            "",
            *table,
            "",
            *[f"- {line}" for line in totals_lines(summary)],
            *curve,
            "",
        ]
    )
