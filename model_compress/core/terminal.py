"""What every command shares on the terminal: the consoles, one-line errors, progress, tables.

Each command (the methods' own in ``<method>/command.py``, eval and inspect in ``cli``) builds on these,
so a new method adds its command without touching the CLI package.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import UserError

console = Console()
if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
    console = Console(width=200)
status_console = Console(stderr=True)


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
        except KeyboardInterrupt as interrupt:  # a command that kept its work says where, in the interrupt's message
            typer.echo(f"interrupted: {interrupt.args[0] if interrupt.args else 'nothing was written'}", err=True)
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the one place every unexpected failure is turned into a line
            if kwargs.get("debug"):
                raise
            from .failures import describe_failure

            typer.echo(f"error: {describe_failure(error)}", err=True)
            raise typer.Exit(1) from None

    return wrapper


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


class PlainLog:
    """Progress as plain lines where no terminal shows a bar (a log file, a pipe, CI).

    Rich's bars are drawn only on a terminal; elsewhere each line carries the elapsed time, and the
    frequent kind (a step of a loop) is printed at most every ``LOG_SECONDS``.
    """

    LOG_SECONDS = 10.0

    def __init__(self, console: Console) -> None:
        self.console = console
        self.start = time.monotonic()
        self.logged = -self.LOG_SECONDS

    @property
    def active(self) -> bool:
        return not self.console.is_terminal

    def line(self, text: str, always: bool = False) -> None:
        if not self.active:
            return
        now = time.monotonic()
        if always or now - self.logged >= self.LOG_SECONDS:
            self.logged = now
            self.console.print(f"[{now - self.start:6.0f} s] {text}", highlight=False, soft_wrap=True)


class Pace:
    """Seconds per item of a loop since its first counted item, and the time left at that pace: for the plain lines
    of long runs (a 7B conversion's blocks), where no bar shows an estimate."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.counted = 0

    def tick(self) -> None:
        """One item done (the first call only starts the clock)."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
        else:
            self.counted += 1

    def text(self, left: int, unit: str) -> str:
        """'12.3 s per block, about 6 min left'; empty before two items."""
        if self.first is None or not self.counted:
            return ""
        each = (time.monotonic() - self.first) / self.counted
        remaining = each * left
        when = f"{remaining / 60:.0f} min" if remaining >= 90 else f"{remaining:.0f} s"
        return f", {each:.1f} s per {unit}, about {when} left"


class RichStageProgress:
    """One Rich progress line per stage (implements EvalObserver and DistillObserver); plain lines off a terminal."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None
        self.log = PlainLog(progress.console)
        self.description = ""
        self.total: int | None = None
        self.done = 0

    def stage(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)
        self.description, self.total, self.done = description, total, 0
        self.log.line(description, always=True)

    def advance(self, amount: int = 1) -> None:
        self.progress.advance(self.task, amount)
        self.done += amount
        of = f" of {self.total}" if self.total else ""
        self.log.line(f"{self.description}: {self.done}{of}", always=self.total is not None and self.done == self.total)

    def block_finished(self, result) -> None:
        self.progress.console.print(
            f"{result.name}: relative error {result.init_error:.3f} -> {result.final_error:.3f} ({result.seconds:.1f} s)",
            highlight=False,
        )


def progress_bars() -> Progress:
    """The commands' Rich progress on stderr: bars on a terminal, nothing drawn elsewhere (PlainLog speaks there)."""
    return Progress(*progress_columns(), console=status_console, transient=True, disable=not status_console.is_terminal)


class LoadingStatus:
    """A spinner (or a plain line) while the original loads: shown only once the checks before the load passed."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.log = PlainLog(progress.console)
        self.task = None

    def started(self, source) -> None:
        self.task = self.progress.add_task(f"loading {source.label}", total=None)
        self.log.line(f"loading {source.label}", always=True)

    def finished(self, source) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.log.line(f"loaded {source.label}", always=True)


def progress_columns() -> tuple:
    return (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())


def quiet_transformers() -> None:
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
