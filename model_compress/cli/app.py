"""The `compress` command line: the Typer app, the methods' commands, `inspect` and `eval`.

Every UserError becomes one line on stderr and exit code 1; nothing here does model work itself.
Each registered method brings its own command (``Method.command``), so this module names none.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..core.errors import UserError
from ..core.methods import load_methods, registered
from ..core.sizes import megabytes
from ..core.sizes import ratio as format_ratio
from ..core.terminal import Debug, RichStageProgress, console, print_table_and_lines, progress_bars, quiet_transformers, reports_user_errors, status_console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Model surgery and compression for PyTorch / Hugging Face transformers.",
)


def _print_version(value: bool) -> None:
    if value:
        from ..core.version import __version__

        typer.echo(f"model-compress {__version__}")
        raise typer.Exit()


@app.callback()
def commands(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the installed version and exit.")
    ] = False,
) -> None:
    """Model surgery and compression for PyTorch / Hugging Face transformers."""


def add_method_commands() -> None:
    """Each registered method's own command, listed in ``compress --help`` by the method's ``rank``."""
    load_methods()
    for method in registered():
        if method.command is not None:
            importlib.import_module(method.command).add_command(app)


add_method_commands()


@app.command()
@reports_user_errors
def inspect(
    folder: Annotated[Path, typer.Argument(help="A folder written by `compress rpq` or `compress fff-distill`.")],
    device: Annotated[str, typer.Option(help="Where to load it to check it: auto, cpu, cuda, cuda:N.")] = "cpu",
    debug: Debug = False,
) -> None:
    """Check a compressed checkpoint (files, tensors, loading) and show what its conversion did."""
    from ..core.checkpoint import REPORT_FILE, load
    from ..core.methods import method_of
    from ..core.sizes import model_bytes
    from ..core.sources import parse_device

    target = parse_device(device)
    quiet_transformers()
    with status_console.status(f"loading {folder}"):
        model = load(folder, device=target)
    section = model.config.quantization_config
    section = section.to_dict() if hasattr(section, "to_dict") else section
    method = method_of(section)
    console.print(
        f"{folder}: {type(model).__name__}, {method.describe(section)}, {megabytes(model_bytes(model))} of weights, loaded on {target}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"base model: {section.get('base_model', {}).get('label', 'unknown')}", highlight=False, soft_wrap=True)
    report = folder / REPORT_FILE
    if report.is_file():
        print_table_and_lines(method.title, *method.summary_table(json.loads(report.read_text())["summary"]))


def eval_table(result) -> Table:
    """original | compressed | ratio, one row per figure."""
    from ..eval.report import rows, value_label

    table = Table(title=f"compress eval: {result.checkpoint}", title_justify="left")
    for column in ("figure", "original", "compressed", "ratio", "better"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows(result):
        name = f"{row.name} ({row.unit})" if row.unit else row.name
        ratio = "" if row.ratio is None else format_ratio(row.ratio)
        table.add_row(name, value_label(row.original), value_label(row.compressed), ratio, row.better)
    return table


@app.command("eval")
@reports_user_errors
def evaluate(
    folder: Annotated[Path, typer.Argument(help="A folder written by `compress rpq` or `compress fff-distill`.")],
    baseline: Annotated[
        Optional[str], typer.Option(help="The original to compare with (hub id, folder, .gguf); default: the one the checkpoint records.")
    ] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Measure the compressed model alone.")] = False,
    text: Annotated[Optional[Path], typer.Option("--text", help="A local UTF-8 .txt file to evaluate on (default: the packaged Wikipedia sample).")] = None,
    dataset: Annotated[
        Optional[str], typer.Option(help="A hub data set instead (needs network and `datasets`): wikitext2, wikitext103, or a repository id.")
    ] = None,
    dataset_config: Annotated[Optional[str], typer.Option(help="The hub data set's config name.")] = None,
    split: Annotated[Optional[str], typer.Option(help="The hub data set's split (default test).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Window length in tokens (default: min(2048, the model's context)).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Use only the text's first N tokens (faster; reported).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass in the quality pass.")] = 1,
    metric: Annotated[str, typer.Option(help="auto, perplexity (causal LMs), mlm (masked-LM heads), embedding (vs the original).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float16 / the checkpoint's bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16.")] = "auto",
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Time prefill and decode.")] = True,
    prompt_len: Annotated[int, typer.Option(help="Prefill prompt length in tokens.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per decode measurement.")] = 128,
    decode_batch: Annotated[Optional[list[int]], typer.Option(help="Decode batch sizes; repeatable (default 1 and 16).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per figure (the median is reported), after 2 warm-up runs.")] = 5,
    compile_models: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time decoding with both models under torch.compile (static cache; CUDA graphs on CUDA) and count "
            "the graph breaks. Compiling takes a minute or more per model and batch size.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the masked-LM masking.")] = 0,
    decode_weights: Annotated[
        bool,
        typer.Option(
            "--decode-weights",
            help="The compressed layers keep their weights decoded once in 16 bits and multiply with them: much faster "
            "on a CPU, at 2 bytes per weight more memory (reported in the table).",
        ),
    ] = False,
    gpus: Annotated[
        int,
        typer.Option(
            "--gpus",
            help="Spread each model over this many GPUs (from --device's on) with accelerate's device map, for models "
            "larger than one GPU: whole blocks per GPU, timed between synchronisations of every GPU, peak memory summed; "
            "decoding from a CUDA graph or compiled is left out.",
        ),
    ] = 1,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Where to write the JSON report (default: FOLDER/eval_report.json).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Where to write the PNG plot (default: beside the JSON, .png).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing report files.")] = False,
    debug: Debug = False,
) -> None:
    """Perplexity (or MLM loss / embedding similarity), latency, memory and size, side by side with the original.

    Writes FOLDER/eval_report.json and FOLDER/eval_report.png (or --json / --plot). Latency on a CPU is
    slow to measure (minutes for a 135M model) and only indicative: --no-latency skips it.
    """
    from ..core.checkpoint import validate_checkpoint
    from ..core.text import resolve_text
    from ..eval.compare import EvalSettings
    from ..eval.compare import evaluate as run_evaluation
    from ..eval.latency import LatencySettings
    from ..eval.report import write_json, write_plot
    from ..core.sources import parse_device, parse_dtype

    validate_checkpoint(folder)  # a broken checkpoint is the news, before any refusal about the report files
    json_path = json_path or folder / "eval_report.json"
    plot = plot or json_path.with_suffix(".png")
    for path in (json_path, plot):
        if path.exists() and not force:
            raise UserError(f"'{path}' already exists; pass --force to replace it (or choose --json / --plot)")
    if baseline is not None and no_baseline:
        raise UserError("give either --baseline or --no-baseline, not both")
    if compile_models and not latency:
        raise UserError("--compile times decoding: it needs --latency")
    timing = (LatencySettings(prompt_len, new_tokens, tuple(decode_batch or (1, 16)), repeats=repeats, compiled=compile_models)
              if latency else None)
    settings = EvalSettings(
        device=parse_device(device), dtype=parse_dtype(dtype), seq_len=seq_len, max_tokens=max_tokens,
        batch_size=batch_size, metric=metric, seed=seed, latency=timing, decode_weights=decode_weights, gpus=gpus,
    )
    corpus = resolve_text(text, dataset, dataset_config, split)
    quiet_transformers()
    with progress_bars() as progress:
        result = run_evaluation(folder, corpus, settings, baseline, not no_baseline, RichStageProgress(progress))
    console.print(eval_table(result))
    used = result.text
    window = f"{used['windows']} windows of {used['seq_len']}" if "windows" in used else f"{used['sentences']} sentences"
    cap = f", capped by --max-tokens {used['max_tokens']}" if used["max_tokens"] else ""
    console.print(
        f"{result.metric} on {used['name']}: {used['tokens_used']:,} of {used['tokens_in_text']:,} tokens ({window}{cap}); "
        f"device {result.device}, {str(result.dtype).removeprefix('torch.')}; "
        f"original: {result.original.label if result.original else 'not measured'}",
        highlight=False,
        soft_wrap=True,
    )
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="yellow", highlight=False, soft_wrap=True)
    write_json(result, json_path)
    try:
        write_plot(result, plot)
        console.print(f"saved {json_path} and {plot}", highlight=False, soft_wrap=True)
    except ImportError:
        console.print(f"saved {json_path}; no plot: pip install matplotlib", style="yellow", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
