"""The `compress` command line: parses arguments, calls the library, draws progress and tables.

Every UserError becomes one line on stderr and exit code 1; nothing here does model work itself.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import UserError

# Above this mean per-layer error, measured models lose most of their quality (benchmarks/RESULTS.md:
# SmolLM2 at 0.26 and 0.47 is unusable, at 0.09 it is usable).
HIGH_ERROR = 0.2

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Model surgery and compression for PyTorch / Hugging Face transformers.",
)
console = Console()
if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
    console = Console(width=200)
status_console = Console(stderr=True)


@app.callback()
def commands() -> None:
    """Model surgery and compression for PyTorch / Hugging Face transformers."""


def reports_user_errors(command):
    """Turn UserError (and Ctrl-C) into one stderr line and a non-zero exit, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written", err=True)
            raise typer.Exit(130) from None

    return wrapper


class RichConversionProgress:
    """A per-layer Rich progress bar for a conversion (implements ConversionObserver)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None

    def started(self, plans) -> None:
        total = sum(plan.converted for plan in plans)
        self.task = self.progress.add_task("fitting codebooks", total=total)

    def layer_started(self, plan) -> None:
        self.progress.update(self.task, description=f"{plan.layer.name} (M={plan.num_codebooks})")

    def layer_finished(self, result) -> None:
        self.progress.advance(self.task)


def print_summary(summary) -> None:
    """The per-type table, then the totals lines under it."""
    from .quantize.summary import totals_lines

    console.print(conversion_table(summary))
    for line in totals_lines(summary):
        console.print(line, highlight=False, soft_wrap=True)


def conversion_table(summary) -> Table:
    """The end-of-run table: per layer type, then the totals underneath."""
    from .quantize.summary import table_rows

    return rows_table("RPQ conversion", *table_rows(summary))


def rows_table(title: str, header, rows) -> Table:
    """A Rich table: the first column left-aligned (names), the figures right-aligned."""
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


@app.command()
@reports_user_errors
def rpq(
    model: Annotated[
        Optional[str],
        typer.Argument(help="Hub id, local model folder or .gguf file. Omit it for the embedded default (SmolLM2-135M)."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the compressed checkpoint to.")] = ...,
    codebooks: Annotated[int, typer.Option("--codebooks", "-m", help="M: codebooks per layer (pieces each weight column is cut into).")] = 32,
    codebook_size: Annotated[int, typer.Option("--codebook-size", "-k", help="K: codes per codebook; above 256 codes are stored as uint16.")] = 256,
    skip: Annotated[
        Optional[list[str]],
        typer.Option("--skip", help="Leave matching layers dense: a glob on the full name, or a name's last part (lm_head). Repeatable."),
    ] = None,
    device: Annotated[str, typer.Option(help="Where k-means runs: auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (the checkpoint's), float32, float16, bfloat16.")] = "auto",
    seed: Annotated[int, typer.Option(help="k-means seed; the same seed gives the same codes.")] = 0,
    iters: Annotated[int, typer.Option(help="Most k-means iterations per layer.")] = 25,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
) -> None:
    """Reverse product quantization: every Linear / Embedding / Conv1D weight becomes codebooks + uint8 codes."""
    from .models import parse_device, parse_dtype
    from .quantize.convert import RPQSettings
    from .quantize.pipeline import compress_rpq

    settings = RPQSettings(
        num_codebooks=codebooks,
        codebook_size=codebook_size,
        skip=list(skip or []),
        max_iter=iters,
        seed=seed,
        device=parse_device(device),
    )
    torch_dtype = parse_dtype(dtype)
    _quiet_transformers()
    with Progress(*_progress_columns(), console=status_console, transient=True) as progress:
        loading = progress.add_task(f"loading {model or 'the embedded default (SmolLM2-135M)'}", total=None)
        run = compress_rpq(
            model,
            output,
            settings,
            dtype=torch_dtype,
            force=force,
            observer=RichConversionProgress(progress),
            on_loaded=lambda source: progress.remove_task(loading),
        )
    print_summary(run.summary)
    if run.summary.error_mean > HIGH_ERROR:
        console.print(
            f"warning: mean relative error {run.summary.error_mean:.2f} per layer: expect a large loss of quality; "
            "more codebooks (-m) cut each column into shorter pieces and lower it",
            style="yellow",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"source {run.source.label}, M={codebooks}, K={codebook_size}, k-means on {settings.device}, "
        f"{run.summary.seconds:.1f} s; saved to {run.output}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@reports_user_errors
def inspect(
    folder: Annotated[Path, typer.Argument(help="A folder written by `compress rpq` or `compress fff-distill`.")],
    device: Annotated[str, typer.Option(help="Where to load it to check it: auto, cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """Check a compressed checkpoint (files, tensors, loading) and show what its conversion did."""
    from .checkpoint import REPORT_FILE, load
    from .models import parse_device
    from .quantize.summary import ConversionSummary, model_bytes
    from .surgery.summary import DistillSummary

    target = parse_device(device)
    _quiet_transformers()
    with status_console.status(f"loading {folder}"):
        model = load(folder, device=target)
    section = model.config.quantization_config
    section = section.to_dict() if hasattr(section, "to_dict") else section
    if section["quant_method"] == "fff":
        what = f"FFF, {len(section['blocks'])} FF blocks as trees (depth {section['settings']['depth']})"
    else:
        what = (
            f"RPQ M={section['num_codebooks']} K={section['codebook_size']}, "
            f"{len(section['layers'])} RPQ layers, {len(section['dense'])} dense"
        )
    console.print(
        f"{folder}: {type(model).__name__}, {what}, {model_bytes(model) / 1e6:.1f} MB of weights, loaded on {target}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"base model: {section.get('base_model', {}).get('label', 'unknown')}", highlight=False, soft_wrap=True)
    report = folder / REPORT_FILE
    if report.is_file():
        summary = json.loads(report.read_text())["summary"]
        if section["quant_method"] == "fff":
            print_distill_summary(DistillSummary.from_json(summary))
        else:
            print_summary(ConversionSummary.from_json(summary))


class RichStageProgress:
    """One Rich progress line per stage (implements EvalObserver and DistillObserver)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None

    def stage(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, amount: int = 1) -> None:
        self.progress.advance(self.task, amount)

    def block_finished(self, result) -> None:
        self.progress.console.print(
            f"{result.name}: relative error {result.init_error:.3f} -> {result.final_error:.3f} ({result.seconds:.1f} s)",
            highlight=False,
        )


def eval_table(result) -> Table:
    """original | compressed | ratio, one row per figure."""
    from .eval.report import rows

    table = Table(title=f"compress eval: {result.checkpoint}", title_justify="left")
    for column in ("figure", "original", "compressed", "ratio", "better"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows(result):
        name = f"{row.name} ({row.unit})" if row.unit else row.name
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}"
        table.add_row(name, _number(row.original), _number(row.compressed), ratio, row.better)
    return table


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _progress_columns() -> tuple:
    return (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())


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
    seed: Annotated[int, typer.Option(help="Seed of the masked-LM masking.")] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Where to write the JSON report (default: FOLDER/eval_report.json).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Where to write the PNG plot (default: beside the JSON, .png).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing report files.")] = False,
) -> None:
    """Perplexity (or MLM loss / embedding similarity), latency, memory and size, side by side with the original."""
    from .data import resolve_text
    from .eval.compare import EvalSettings
    from .eval.compare import evaluate as run_evaluation
    from .eval.latency import LatencySettings
    from .eval.report import write_json, write_plot
    from .models import parse_device, parse_dtype

    json_path = json_path or folder / "eval_report.json"
    plot = plot or json_path.with_suffix(".png")
    for path in (json_path, plot):
        if path.exists() and not force:
            raise UserError(f"'{path}' already exists; pass --force to replace it (or choose --json / --plot)")
    if baseline is not None and no_baseline:
        raise UserError("give either --baseline or --no-baseline, not both")
    timing = LatencySettings(prompt_len, new_tokens, tuple(decode_batch or (1, 16)), repeats=repeats) if latency else None
    settings = EvalSettings(
        device=parse_device(device), dtype=parse_dtype(dtype), seq_len=seq_len, max_tokens=max_tokens,
        batch_size=batch_size, metric=metric, seed=seed, latency=timing,
    )
    corpus = resolve_text(text, dataset, dataset_config, split)
    _quiet_transformers()
    with Progress(*_progress_columns(), console=status_console, transient=True) as progress:
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


def print_distill_summary(summary) -> None:
    """The per-block table, then the totals lines under it."""
    from .surgery.summary import table_rows, totals_lines

    table = rows_table("FFF distillation", *table_rows(summary))
    console.print(table)
    for line in totals_lines(summary):
        console.print(line, highlight=False, soft_wrap=True)


@app.command("fff-distill")
@reports_user_errors
def fff_distill(
    model: Annotated[
        Optional[str],
        typer.Argument(help="Hub id, local model folder or .gguf file. Omit it for the embedded default (all-MiniLM-L6-v2)."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the distilled checkpoint to.")] = ...,
    depth: Annotated[int, typer.Option(help="Tree depth: 2**depth leaves, depth routers per token.")] = 3,
    leaf_width: Annotated[Optional[int], typer.Option(help="Neurons per leaf (default: the block's width / 2**depth, keeping every neuron).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="FF blocks to convert, by layer index: 0-11, 0-3,6 (default: all).")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="A UTF-8 .txt file to calibrate on (default: the packaged C4 sample; never the eval text).")] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens to record (10% are held out to measure the error).")] = 32768,
    seq_len: Annotated[int, typer.Option(help="Calibration window length in tokens.")] = 512,
    steps: Annotated[int, typer.Option(help="Training steps per block.")] = 400,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per training step.")] = 1024,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the per-block training.")] = 1e-3,
    e2e_steps: Annotated[int, typer.Option(help="Steps of end-to-end distillation on the original's outputs afterwards (0: none).")] = 0,
    e2e_lr: Annotated[float, typer.Option(help="Learning rate of the end-to-end distillation.")] = 1e-5,
    device: Annotated[str, typer.Option(help="Where recording and training run: auto, cpu, cuda, cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the training batches.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
) -> None:
    """Replace feed-forward blocks by Fast FeedForward trees distilled from them (one leaf per token at inference)."""
    from .data import calibration_text
    from .models import parse_device
    from .surgery.distill import FFFSettings
    from .surgery.pipeline import distill_fff

    settings = FFFSettings(
        depth=depth, leaf_width=leaf_width, layers=layers, steps=steps, batch_tokens=batch_tokens, lr=lr,
        calib_tokens=calib_tokens, seq_len=seq_len, e2e_steps=e2e_steps, e2e_lr=e2e_lr, seed=seed, device=parse_device(device),
    )
    text = calibration_text(calib)
    _quiet_transformers()
    with Progress(*_progress_columns(), console=status_console, transient=True) as progress:
        loading = progress.add_task(f"loading {model or 'the embedded default (all-MiniLM-L6-v2)'}", total=None)
        run = distill_fff(
            model, output, settings, text, force=force, observer=RichStageProgress(progress),
            on_loaded=lambda source: progress.remove_task(loading),
        )
    print_distill_summary(run.summary)
    console.print(
        f"source {run.source.label}, depth {depth}, on {settings.device}, {run.summary.seconds:.1f} s; saved to {run.output}",
        highlight=False,
        soft_wrap=True,
    )


def _quiet_transformers() -> None:
    """transformers' own progress bars and advisory warnings would drown ours (CLI only).

    The GGUF loader draws a plain tqdm bar, which transformers' switch does not reach, and tqdm
    reads TQDM_DISABLE only when it is first imported (already done by then): so the default is
    changed the way tqdm itself applies that variable.
    """
    from tqdm import std

    import transformers

    if not getattr(std.tqdm.__init__, "_quieted_by_compress", False):
        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
        std.tqdm.__init__._quieted_by_compress = True
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
