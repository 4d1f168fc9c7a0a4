"""`compress fff-distill`: its options, its progress on the terminal and its end-of-run table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.sizes import larger_than_input_warning
from ..core.terminal import Debug, RichStageProgress, console, LoadingStatus, print_table_and_lines, progress_bars, quiet_transformers, reports_user_errors


def add_command(app: typer.Typer) -> None:
    """Put ``compress fff-distill`` on the app."""
    app.command("fff-distill")(fff_distill)


@reports_user_errors
def fff_distill(
    model: Annotated[
        Optional[str],
        typer.Argument(help="Hub id, local model folder or .gguf file. Omit it for the embedded default (all-MiniLM-L6-v2)."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the distilled checkpoint to.")] = ...,
    depth: Annotated[int, typer.Option(help="Tree depth: 2**depth leaves, depth routers per token.")] = 3,
    neurons_per_token: Annotated[
        Optional[float],
        typer.Option(help="Share of each block's neurons a token runs, in (0, 1]: the most used neurons always on, plus its leaves (default: the leaves alone, --leaves-per-token / 2**depth)."),
    ] = None,
    leaves_per_token: Annotated[
        int, typer.Option(help="Leaves each token runs, their outputs added: its route's leaf, then those whose paths overrule the routers least (2: a token unsure at one node gets both sides).")
    ] = 1,
    leaf_width: Annotated[Optional[int], typer.Option(help="Neurons per leaf (default: the neurons beside the always-on part / 2**depth, keeping every neuron).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="FF blocks to convert, by layer index: 0-11, 0-3,6 (default: all).")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="A UTF-8 .txt file to calibrate on (default: the packaged calibration samples, web pages, code and several languages; never the eval text).")] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens to record (10% are held out to measure the error).")] = 32768,
    seq_len: Annotated[int, typer.Option(help="Calibration window length in tokens.")] = 512,
    allocate: Annotated[
        bool, typer.Option("--allocate/--uniform", help="With --neurons-per-token: measure the model with each block replaced and give more neurons where it loses most, at that mean (5x the building time).")
    ] = False,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Refit each leaf's output rows in closed form on the tokens routed to it.")] = True,
    steps: Annotated[int, typer.Option(help="Training steps per block.")] = 400,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per training step.")] = 1024,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the per-block training.")] = 1e-3,
    hard_fraction: Annotated[float, typer.Option(help="Share of the per-block steps trained under the hard routing inference uses (the rest soft, all leaves weighted, temperature lowered).")] = 0.25,
    e2e_steps: Annotated[int, typer.Option(help="Steps of end-to-end distillation on the original's outputs afterwards (0: none).")] = 0,
    e2e_lr: Annotated[float, typer.Option(help="Learning rate of the end-to-end distillation.")] = 1e-5,
    device: Annotated[str, typer.Option(help="Where recording and training run: auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Dtype of the saved weights: auto (the checkpoint's; float32 for a GGUF file), float32, float16, bfloat16. Fitting runs in float32 either way.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the training batches.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    debug: Debug = False,
) -> None:
    """Replace feed-forward blocks by Fast FeedForward trees distilled from them (one leaf per token at inference)."""
    from ..core.text import calibration_text
    from ..core.sources import parse_device, parse_dtype
    from .distill import FFFSettings
    from .pipeline import distill_fff

    settings = FFFSettings(
        depth=depth, neurons_per_token=neurons_per_token, leaf_width=leaf_width, leaves_per_token=leaves_per_token, refit=refit, allocate=allocate, layers=layers, steps=steps, batch_tokens=batch_tokens, lr=lr, hard_fraction=hard_fraction,
        calib_tokens=calib_tokens, seq_len=seq_len, e2e_steps=e2e_steps, e2e_lr=e2e_lr, seed=seed, device=parse_device(device),
        saved_dtype=parse_dtype(dtype),
    )
    text = calibration_text(calib)
    quiet_transformers()
    with progress_bars() as progress:
        status = LoadingStatus(progress)
        run = distill_fff(
            model, output, settings, text, force=force, observer=RichStageProgress(progress),
            on_loading=status.started, on_loaded=status.finished,
        )
    from .summary import table_rows, totals_lines

    print_table_and_lines("FFF distillation", *table_rows(run.summary), totals_lines(run.summary))
    summary = run.summary
    warning = larger_than_input_warning(summary.input_file_bytes, summary.output_file_bytes, summary.input_form)
    if warning:
        console.print(f"warning: {warning}", style="yellow", highlight=False, soft_wrap=True)
    console.print(
        f"source {run.source.label}, depth {depth}, on {settings.device}, {run.summary.seconds:.1f} s; saved to {run.output}",
        highlight=False,
        soft_wrap=True,
    )
