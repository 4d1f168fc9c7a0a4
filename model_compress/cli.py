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

    header, rows = table_rows(summary)
    table = Table(title="RPQ conversion", title_justify="left")
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
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=status_console, transient=True) as progress:
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
    folder: Annotated[Path, typer.Argument(help="A folder written by `compress rpq`.")],
    device: Annotated[str, typer.Option(help="Where to load it to check it: auto, cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """Check a compressed checkpoint (files, tensors, loading) and show what its conversion did."""
    from .checkpoint import REPORT_FILE, load
    from .models import parse_device
    from .quantize.summary import ConversionSummary, model_bytes

    target = parse_device(device)
    _quiet_transformers()
    with status_console.status(f"loading {folder}"):
        model = load(folder, device=target)
    section = model.config.quantization_config
    section = section.to_dict() if hasattr(section, "to_dict") else section
    console.print(
        f"{folder}: {type(model).__name__}, RPQ M={section['num_codebooks']} K={section['codebook_size']}, "
        f"{len(section['layers'])} RPQ layers, {len(section['dense'])} dense, "
        f"{model_bytes(model) / 1e6:.1f} MB of weights, loaded on {target}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"base model: {section.get('base_model', {}).get('label', 'unknown')}", highlight=False, soft_wrap=True)
    report = folder / REPORT_FILE
    if report.is_file():
        print_summary(ConversionSummary.from_json(json.loads(report.read_text())["summary"]))


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
