"""The `compress` command line: parses arguments, calls the library, draws progress and tables.

Every UserError becomes one line on stderr and exit code 1; nothing here does model work itself.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..core.errors import UserError
from ..rpq.fit.defaults import CALIBRATION_TOKENS, DEFAULT_BITS, DEFAULT_ROUNDS, FINETUNE_STEPS

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


Debug = Annotated[bool, typer.Option("--debug", help="On an unexpected failure, print the full traceback instead of one line.")]


def reports_user_errors(command):
    """Turn UserError (and Ctrl-C) into one stderr line and a non-zero exit, never a traceback.

    Any other exception (a model's own code failing inside a forward, say) is one line too, naming the
    module that raised it; the command's ``--debug`` shows the whole traceback instead.
    """

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
        except Exception as error:  # noqa: BLE001 - the one place every unexpected failure is turned into a line
            if kwargs.get("debug"):
                raise
            from ..core.failures import describe_failure

            typer.echo(f"error: {describe_failure(error)}", err=True)
            raise typer.Exit(1) from None

    return wrapper


class RichConversionProgress:
    """Progress of a conversion: measuring candidates per block, fitting per layer, fine-tuning per step.

    On a terminal, Rich bars; elsewhere (a log file, CI) a plain line per block measured and, at most
    every LOG_SECONDS, one for fitting and fine-tuning, each with the elapsed time.
    """

    LOG_SECONDS = 10.0

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.total = 0
        self.done = 0
        self.start = time.monotonic()
        self.logged = -self.LOG_SECONDS

    def _task(self, key: str, description: str, total: int) -> int:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total)
        return self.tasks[key]

    def _log(self, text: str, always: bool = False) -> None:
        if self.progress.console.is_terminal:
            return
        now = time.monotonic()
        if always or now - self.logged >= self.LOG_SECONDS:
            self.logged = now
            self.progress.console.print(f"[{now - self.start:6.0f} s] {text}", highlight=False, soft_wrap=True)

    def started(self, plans) -> None:
        self.total = sum(plan.converted for plan in plans)

    def measuring(self, done: int, total: int) -> None:
        self.progress.update(self._task("measure", "measuring candidate formats per block", total), completed=done)
        self._log(f"measuring candidate formats: block {done} of {total}", always=True)

    def layer_started(self, plan) -> None:
        self.progress.update(self._task("fit", "fitting", self.total), description=f"fitting {plan.layer.name}")
        self._log(f"fitting {plan.layer.name}: layer {self.done + 1} of {self.total}")

    def layer_finished(self, result) -> None:
        self.done += 1
        self.progress.advance(self._task("fit", "fitting", self.total))

    def finetune_step(self, step: int, total: int) -> None:
        self.progress.update(self._task("finetune", "fine-tuning codebooks", total), completed=step)
        self._log(f"fine-tuning: step {step} of {total}", always=step == total)


def print_table_and_lines(title: str, header, rows, lines: list[str]) -> None:
    """A method's end-of-run table, then the totals lines under it."""
    console.print(rows_table(title, header, rows))
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


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
    bits: Annotated[
        Optional[float],
        typer.Option(help=f"Bit budget per converted weight (codes, codebooks and scales counted); formats chosen per layer. Default {DEFAULT_BITS:g}."),
    ] = None,
    codebooks: Annotated[Optional[int], typer.Option("--codebooks", "-m", help="Fixed M for every layer: codebooks per layer (pieces each weight column is cut into). Instead of --bits.")] = None,
    codebook_size: Annotated[Optional[int], typer.Option("--codebook-size", "-k", help="Fixed K for every layer: codes per codebook (2-65536; default 256 with --codebooks). Instead of --bits.")] = None,
    codebook_bits: Annotated[Optional[int], typer.Option(help="Codebook storage: 8 (int8 + one scale per codebook) or 16. Default: chosen per layer with --bits, the model's dtype with --codebooks.")] = None,
    calib: Annotated[
        Optional[str],
        typer.Option(help="UTF-8 text file to calibrate on (default: the packaged calibration samples, web pages, code and several languages; never the eval text), or 'none' to fit the weights alone."),
    ] = None,
    calib_tokens: Annotated[Optional[int], typer.Option(help=f"Calibration tokens (default: {CALIBRATION_TOKENS['cuda']:,} on CUDA, {CALIBRATION_TOKENS['cpu']:,} on a CPU; capped by the text). A tenth is held out.")] = None,
    calib_seq_len: Annotated[Optional[int], typer.Option(help="Calibration window in tokens (default: min(2048, the model's context)).")] = None,
    finetune_steps: Annotated[Optional[int], typer.Option(help=f"End-to-end fine-tuning steps on KL to the original, codes fixed (default: {FINETUNE_STEPS['cuda']} on CUDA, {FINETUNE_STEPS['cpu']} on a CPU).")] = None,
    finetune_lr: Annotated[float, typer.Option(help="Adam learning rate of the fine-tuning.")] = 1e-4,
    rounds: Annotated[
        Optional[int], typer.Option(help=f"Most rounds of code sweep + codebook refit per layer (default: {DEFAULT_ROUNDS['cuda']} on CUDA, {DEFAULT_ROUNDS['cpu']} on a CPU).")
    ] = None,
    skip: Annotated[
        Optional[list[str]],
        typer.Option("--skip", help="Leave matching layers dense: a glob on the full name, or a name's last part (lm_head). Repeatable."),
    ] = None,
    device: Annotated[str, typer.Option(help="Where calibration, fitting and fine-tuning run: auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (the checkpoint's), float32, float16, bfloat16.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of k-means and fine-tuning; the same seed gives the same codes.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    debug: Debug = False,
) -> None:
    """Reverse product quantization: every Linear / Embedding / Conv1D weight becomes codebooks + packed codes, fitted on calibration text."""
    from ..core.sources import parse_device, parse_dtype
    from ..rpq.convert import RPQSettings
    from ..rpq.fit.finetune import FinetuneSettings
    from ..rpq.pipeline import CalibrationOptions, compress_rpq, default_finetune_steps

    target = parse_device(device)
    settings = RPQSettings(
        bits=bits, num_codebooks=codebooks, codebook_size=codebook_size, codebook_bits=codebook_bits,
        skip=list(skip or []), rounds=rounds, seed=seed, device=target,
    )
    no_calibration = calib is not None and calib.lower() == "none"
    calibration = CalibrationOptions(
        enabled=not no_calibration, text=None if calib is None or no_calibration else Path(calib),
        tokens=calib_tokens, seq_len=calib_seq_len,
    )
    steps = finetune_steps if finetune_steps is not None else (default_finetune_steps(target) if not no_calibration else 0)
    finetuning = FinetuneSettings(steps=steps, lr=finetune_lr, seed=seed)
    torch_dtype = parse_dtype(dtype)
    _quiet_transformers()
    with Progress(*_progress_columns(), console=status_console, transient=True) as progress:
        loading = progress.add_task(f"loading {model or 'the embedded default (SmolLM2-135M)'}", total=None)
        observer = RichConversionProgress(progress)
        run = compress_rpq(
            model,
            output,
            settings,
            calibration=calibration,
            finetuning=finetuning,
            dtype=torch_dtype,
            force=force,
            observer=observer,
            on_loaded=lambda source: progress.remove_task(loading),
            on_finetune_step=observer.finetune_step,
        )
    from ..rpq.summary import table_rows, totals_lines

    print_table_and_lines("RPQ conversion", *table_rows(run.summary), totals_lines(run.summary))
    for warning in quality_warnings(run):
        console.print(f"warning: {warning}", style="yellow", highlight=False, soft_wrap=True)
    what = f"--bits {settings.budget:g}" if not settings.fixed else f"M={run.config.num_codebooks}, K={run.config.codebook_size}"
    console.print(
        f"source {run.source.label}, {what}, fitted on {settings.device}, {run.summary.seconds:.1f} s; saved to {run.output}",
        highlight=False,
        soft_wrap=True,
    )


def quality_warnings(run) -> list[str]:
    """Plain words where the measured errors say the model lost much of its quality, with the --bits that would not."""
    from ..rpq.summary import HIGH_OUTPUT_ERROR, HIGH_WEIGHT_ERROR

    summary = run.summary
    output_error = summary.output_error_mean
    if output_error is not None and output_error <= HIGH_OUTPUT_ERROR:
        return []
    if output_error is None and summary.error_mean <= HIGH_WEIGHT_ERROR:
        return []
    measured = (
        f"mean relative output error {output_error:.3f} per layer" if output_error is not None
        else f"mean relative weight error {summary.error_mean:.2f} per layer (no calibration data)"
    )
    allocation = run.conversion.allocation
    suggestion = allocation.usable_bits(HIGH_OUTPUT_ERROR) if allocation is not None else None
    if suggestion is not None:
        advice = f"--bits {suggestion:g} keeps the measured error under {HIGH_OUTPUT_ERROR:g}"
    elif output_error is not None:
        advice = f"no format measured near this budget keeps it under {HIGH_OUTPUT_ERROR:g}: raise --bits, or --skip the worst layers"
    else:
        advice = f"use --bits (default {DEFAULT_BITS:g}) with calibration text, or raise it"
    return [f"{measured}: expect a large loss of quality; {advice}"]


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
    _quiet_transformers()
    with status_console.status(f"loading {folder}"):
        model = load(folder, device=target)
    section = model.config.quantization_config
    section = section.to_dict() if hasattr(section, "to_dict") else section
    method = method_of(section)
    console.print(
        f"{folder}: {type(model).__name__}, {method.describe(section)}, {model_bytes(model) / 1e6:.1f} MB of weights, loaded on {target}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"base model: {section.get('base_model', {}).get('label', 'unknown')}", highlight=False, soft_wrap=True)
    report = folder / REPORT_FILE
    if report.is_file():
        print_table_and_lines(method.title, *method.summary_table(json.loads(report.read_text())["summary"]))


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
    from ..eval.report import rows

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
    debug: Debug = False,
) -> None:
    """Perplexity (or MLM loss / embedding similarity), latency, memory and size, side by side with the original."""
    from ..core.text import resolve_text
    from ..eval.compare import EvalSettings
    from ..eval.compare import evaluate as run_evaluation
    from ..eval.latency import LatencySettings
    from ..eval.report import write_json, write_plot
    from ..core.sources import parse_device, parse_dtype

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
    calib: Annotated[Optional[Path], typer.Option(help="A UTF-8 .txt file to calibrate on (default: the packaged calibration samples, web pages, code and several languages; never the eval text).")] = None,
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
    debug: Debug = False,
) -> None:
    """Replace feed-forward blocks by Fast FeedForward trees distilled from them (one leaf per token at inference)."""
    from ..core.text import calibration_text
    from ..core.sources import parse_device
    from ..fff.distill import FFFSettings
    from ..fff.pipeline import distill_fff

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
    from ..fff.summary import table_rows, totals_lines

    print_table_and_lines("FFF distillation", *table_rows(run.summary), totals_lines(run.summary))
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
