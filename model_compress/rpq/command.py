"""`compress rpq`: its options, its progress on the terminal, its end-of-run table and warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from ..core.sizes import larger_than_input_warning
from ..core.terminal import Debug, Pace, PlainLog, console, LoadingStatus, print_table_and_lines, progress_bars, quiet_transformers, reports_user_errors
from .fit.defaults import CALIBRATION_TOKENS, DEFAULT_BITS, DEFAULT_ROTATION_BLOCK, DEFAULT_ROUNDS, FINETUNE_STEPS


def add_command(app: typer.Typer) -> None:
    """Put ``compress rpq`` on the app."""
    app.command("rpq")(rpq)


class RichConversionProgress:
    """Progress of a conversion: measuring candidates per block, fitting per layer, fine-tuning per step.

    On a terminal, Rich bars; elsewhere (a log file, CI) a plain line per block measured and, at most
    every few seconds, one for fitting and fine-tuning, each with the elapsed time (``PlainLog``).
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.total = 0
        self.started_layers = 0
        self.done = 0
        self.log = PlainLog(progress.console)
        self.measure_pace, self.fit_pace, self.finetune_pace = Pace(), Pace(), Pace()
        self.states_said = False

    def _task(self, key: str, description: str, total: int) -> int:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total)
        return self.tasks[key]

    def started(self, plans) -> None:
        self.total = sum(plan.converted for plan in plans)

    def measuring(self, done: int, total: int) -> None:
        self.progress.update(self._task("measure", "measuring candidate formats per block", total), completed=done)
        self.measure_pace.tick()  # the clock starts at the first block's end: that block's time includes the set-up
        pace = self.measure_pace.text(total - done, "block")
        self.log.line(f"measuring candidate formats: block {done} of {total}{pace}", always=True)

    def calibration_states(self, placement) -> None:
        """On a GPU: where the states are kept, said at the first pass, and at every pass that keeps them in host memory."""
        if placement.spilled or (placement.free_bytes is not None and not self.states_said):
            self.states_said = True
            self.progress.console.print(placement.describe(), highlight=False, soft_wrap=True)

    def layer_started(self, plan) -> None:
        self.progress.update(self._task("fit", "fitting", self.total), description=f"fitting {plan.layer.name}")
        self.started_layers += 1
        self.fit_pace.tick()
        pace = self.fit_pace.text(self.total - self.done, "layer")
        self.log.line(f"fitting {plan.layer.name}: layer {self.done + 1} of {self.total}{pace}", always=self.started_layers == 1)

    def layer_finished(self, result) -> None:
        self.done += 1
        self.progress.advance(self._task("fit", "fitting", self.total))
        if self.done == self.total:
            self.log.line(f"fitted {self.total} layers", always=True)

    def finetune_step(self, step: int, total: int) -> None:
        self.progress.update(self._task("finetune", "fine-tuning codebooks", total), completed=step)
        self.finetune_pace.tick()  # from the first step's end: its time includes the first held-out check
        pace = self.finetune_pace.text(total - step, "step")
        self.log.line(f"fine-tuning: step {step} of {total}{pace}", always=step in (1, total))


@reports_user_errors
def rpq(
    ctx: typer.Context,
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
    any_format: Annotated[
        bool,
        typer.Option("--any-format", help="With --bits, also offer Linear layers the formats without a fast GPU kernel (3-bit and 16-bit tables, vectors): more choices for the budget, up to several times slower per layer on a GPU. By default they are offered only where the budget lies outside the fast formats' costs (under about 4 or over about 5.5 bits per weight)."),
    ] = False,
    rotation: Annotated[
        Optional[str],
        typer.Option(help="Input rotation before coding: hadamard (random signs times a block Hadamard matrix; outliers spread, better quality at the same bits) or none. Default: hadamard with --bits, none with --codebooks (rpq-pytorch's form)."),
    ] = None,
    rotation_block: Annotated[
        Optional[int],
        typer.Option(help=f"Hadamard block of the rotation: a power of two from 16 to 512 (default {DEFAULT_ROTATION_BLOCK}); a width it does not divide takes the largest power of two that does."),
    ] = None,
    calib: Annotated[
        Optional[str],
        typer.Option(help="UTF-8 text file to calibrate on (default: the packaged calibration samples, web pages, code and several languages; never the eval text), or 'none' to fit the weights alone."),
    ] = None,
    calib_tokens: Annotated[Optional[int], typer.Option(help=f"Calibration tokens (default: {CALIBRATION_TOKENS['cuda']:,} on CUDA, {CALIBRATION_TOKENS['cpu']:,} on a CPU; capped by the text). A tenth is held out.")] = None,
    calib_seq_len: Annotated[Optional[int], typer.Option(help="Calibration window in tokens (default: min(2048, the model's context)).")] = None,
    finetune_steps: Annotated[Optional[int], typer.Option(help=f"End-to-end fine-tuning steps on KL to the original, codes fixed (default: {FINETUNE_STEPS['cuda']} on CUDA, {FINETUNE_STEPS['cpu']} on a CPU).")] = None,
    finetune_lr: Annotated[float, typer.Option(help="Adam learning rate of the fine-tuning.")] = 1e-4,
    finetune_checkpointing: Annotated[str, typer.Option(help="Recompute each block in the backward pass instead of keeping its activations while fine-tuning: auto (where one step's estimated activations do not fit half the free memory), on or off. The same steps; on costs one more forward pass of each block per step.")] = "auto",
    rounds: Annotated[
        Optional[int], typer.Option(help=f"Most rounds of code sweep + codebook refit per layer (default: {DEFAULT_ROUNDS['cuda']} on CUDA, {DEFAULT_ROUNDS['cpu']} on a CPU).")
    ] = None,
    skip: Annotated[
        Optional[list[str]],
        typer.Option("--skip", help="Leave matching layers dense: a glob on the full name, or a name's last part (lm_head). Repeatable."),
    ] = None,
    device: Annotated[str, typer.Option(help="Where calibration, fitting and fine-tuning run: auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (the checkpoint's), float32, float16, bfloat16.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of k-means and fine-tuning; the same seed gives the same codes on a CPU (on CUDA, sums by code add in the order the GPU picks).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Load a checkpoint whose weights are pickled .bin files (loading a pickle runs the code in it: only for checkpoints you trust). Without it such a checkpoint is refused."),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option("--stream/--no-stream", help="Read a safetensors checkpoint one block at a time as the conversion reaches it (host memory does not grow with the model); --no-stream loads it whole first. GGUF files always load whole."),
    ] = True,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Go on with a conversion into the same output folder that stopped (Ctrl-C, a crash, a lost machine), from the last block it finished; the source and every setting must be the same as the stopped run's."),
    ] = False,
    head_index: Annotated[
        bool,
        typer.Option("--head-index", help="Also give the LM head a certified product-quantized index (saved as head_index.safetensors beside the weights): each decoding step scores every vocabulary row approximately from 8-bit codes, computes exact logits for a shortlist, and certifies that no other row can beat its best, so the greedy token is always the dense head's (logits outside the shortlist are -inf). For large vocabularies; fitted on the calibration text's hidden states."),
    ] = False,
    max_gpu_memory: Annotated[
        Optional[str],
        typer.Option("--max-gpu-memory", help="Most GPU memory this run may take, such as 24GB or 20GiB (torch's allocator holds it to that): where calibration states live, whether fine-tuning recomputes blocks and where converted blocks are kept are chosen to fit it, as on a GPU of that size. Default: the whole GPU."),
    ] = None,
    gpus: Annotated[
        int,
        typer.Option("--gpus", help="Spread the conversion over this many processes, one per GPU (torchrun underneath): each calibrates on its share of the windows, the statistics are summed, the layers' fitting and the fine-tuning's windows are shared out; the same checkpoint as one process gives. With --device cpu the processes share the CPU (gloo)."),
    ] = 1,
    debug: Debug = False,
) -> None:
    """Reverse product quantization: every Linear / Embedding / Conv1D weight becomes codebooks + packed codes, fitted on calibration text."""
    import torch

    from ..core import gpu_memory
    from ..core.spread_launch import check_spread, run_spread
    from ..core.errors import UserError
    from ..core.sources import parse_device, parse_dtype
    from ..core.workers import from_launcher

    check_spread(gpus, device)
    allowed = gpu_memory.parse_size(max_gpu_memory) if max_gpu_memory is not None else None  # refused before any process starts
    if gpus > 1:  # what every process would refuse alike is refused once, here
        from ..core.checkpoint import check_output_folder
        from .resume import check_resumable

        check_output_folder(output, force)
        check_resumable(output, resume)
        run_spread(ctx, gpus)
        return
    from .convert import RPQSettings
    from .fit.finetune import FinetuneSettings
    from .pipeline import CalibrationOptions, compress_rpq, default_finetune_steps

    target = parse_device(device)
    workers = from_launcher(device=target.type)  # started by torchrun: one process per GPU, each on its own
    if workers.spread and target.type == "cuda":
        if target.index is not None:
            raise UserError(f"--device {device}: with several processes each takes its own GPU: pass --device cuda")
        target = torch.device("cuda", torch.cuda.current_device())
    gpu_memory.cap(target, allowed)
    settings = RPQSettings(
        bits=bits, num_codebooks=codebooks, codebook_size=codebook_size, codebook_bits=codebook_bits,
        rotation=rotation.lower() if rotation is not None else None, rotation_block=rotation_block,
        any_format=any_format, skip=list(skip or []), rounds=rounds, seed=seed, device=target,
    )
    no_calibration = calib is not None and calib.lower() == "none"
    calibration = CalibrationOptions(
        enabled=not no_calibration, text=None if calib is None or no_calibration else Path(calib),
        tokens=calib_tokens, seq_len=calib_seq_len,
    )
    steps = finetune_steps if finetune_steps is not None else (default_finetune_steps(target) if not no_calibration else 0)
    finetuning = FinetuneSettings(steps=steps, lr=finetune_lr, seed=seed, checkpointing=finetune_checkpointing)
    torch_dtype = parse_dtype(dtype)
    quiet_transformers()
    options = dict(calibration=calibration, finetuning=finetuning, dtype=torch_dtype, force=force, allow_pickle=allow_pickle,
                   stream=stream, resume=resume, head_index=head_index, workers=workers)
    if not workers.leader:  # the leader speaks for all and writes the output; the others work quietly
        compress_rpq(model, output, settings, **options)
        return
    with progress_bars() as progress:
        status = LoadingStatus(progress)
        observer = RichConversionProgress(progress)
        run = compress_rpq(model, output, settings, observer=observer, on_loading=status.started, on_loaded=status.finished,
                           on_finetune_step=observer.finetune_step, **options)
    from .summary import table_rows, totals_lines

    print_table_and_lines("RPQ conversion", *table_rows(run.summary), totals_lines(run.summary))
    for warning in [*quality_warnings(run), *size_warnings(run.summary)]:
        console.print(f"warning: {warning}", style="yellow", highlight=False, soft_wrap=True)
    if run.head_index is not None:
        shape = run.head_index.describe()
        console.print(f"head index: {shape['rows']:,} rows, {shape['subspaces']} codes of {shape['values_per_code']} values each "
                      f"({shape['code_bits_per_weight']:g} bits per weight), {shape['bytes'] / 1e6:.1f} MB", highlight=False)
    what = f"--bits {settings.budget:g}" if not settings.fixed else f"M={run.config.num_codebooks}, K={run.config.codebook_size}"
    console.print(
        f"source {run.source.label}, {what}, fitted on {settings.device}{gpu_memory.peak_note(target, allowed)}, "
        f"{run.summary.seconds:.1f} s; saved to {run.output}",
        highlight=False,
        soft_wrap=True,
    )


def size_warnings(summary) -> list[str]:
    """The output bigger on disk than the input the user gave (a GGUF already quantized, say)."""
    warning = larger_than_input_warning(summary.input_file_bytes, summary.output_file_bytes, summary.input_form)
    return [warning] if warning else []


def quality_warnings(run) -> list[str]:
    """Plain words where the measured errors say the model lost much of its quality, with the --bits that would not."""
    from .summary import HIGH_OUTPUT_ERROR, HIGH_WEIGHT_ERROR

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
