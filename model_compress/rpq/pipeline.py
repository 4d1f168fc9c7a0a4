"""`compress rpq` as one library call: load, calibrate, convert layer by layer, fine-tune, save the folder whole."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.version import __version__
from ..core.checkpoint import CARD_FILE, MAX_SHARD_SIZE, REPORT_FILE, check_output_folder, weights_bytes, write_folder_atomically
from ..core.text import Text, calibration_text
from ..core.errors import UserError
from ..core.sources import ModelSource, context_length, disk_bytes, empty_model, first_line, load_config, resolve_source, stored_form
from ..core.host_heap import map_large_allocations
from ..core.streamed_load import open_model
from ..core.workers import Workers
from .fit.defaults import CALIBRATION_TOKENS, CALIBRATION_WINDOW, FINETUNE_STEPS, for_device
from .convert import Conversion, ConversionObserver, LayerResult, RPQSettings, convert_model, planned_layers, validate_settings
from .fit.calibration import CalibrationSet, calibration_set
from .resume import ResumeStore, digest, source_files
from .fit.activation_checkpoint import check_mode as check_checkpointing
from .fit.finetune import FinetuneReport, FinetuneSettings, Teacher, finetune
from .quantizer import FORMAT_VERSION, RPQConfig, attach_quantizer
from .layers.modules import KIND_TIED_HEAD
from .model_card import render_model_card
from ..core.sizes import model_bytes, model_params
from .fusions import apply_fusions
from .layer_steps import windows_per_batch
from .head_index.attach import calibrated_index, save_index
from .head_index.module import CertifiedForward
from .summary import ConversionSummary, summarize

@dataclass
class CalibrationOptions:
    """Where calibration text comes from and how much: ``text`` None is the packaged calibration mix (data.calibration_text).

    ``enabled`` False fits without data. ``tokens`` / ``seq_len`` None take the device's defaults.
    """

    enabled: bool = True
    text: Path | None = None
    tokens: int | None = None
    seq_len: int | None = None


@dataclass
class RPQRun:
    """What a run produced: the model (converted, in memory), its config section and the figures."""

    model: nn.Module
    config: RPQConfig
    summary: ConversionSummary
    source: ModelSource
    output: Path | None
    conversion: Conversion
    finetune: FinetuneReport | None
    head_index: CertifiedForward | None = None


def default_finetune_steps(device: torch.device) -> int:
    return for_device(FINETUNE_STEPS, device)


def compress_rpq(
    model: str | None,
    output: str | Path | None,
    settings: RPQSettings,
    *,
    calibration: CalibrationOptions | None = None,
    finetuning: FinetuneSettings | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    stream: bool = True,
    resume: bool = False,
    observer: ConversionObserver | None = None,
    on_loading: Callable[[ModelSource], None] | None = None,
    on_loaded: Callable[[ModelSource], None] | None = None,
    on_finetune_step: Callable[[int, int], None] | None = None,
    head_index: bool = False,
    workers: Workers | None = None,
) -> RPQRun:
    """Load ``model`` (None: the embedded default), convert it, and save it to ``output`` (if given).

    The output folder, the settings and the calibration text are checked before the (long) work
    starts; the folder is written atomically at the end. ``finetuning`` None takes the device's
    default number of steps. ``on_loading(source)`` is called once the checks before the load passed, ``on_loaded(source)``
    once the original is open. A safetensors checkpoint is read block by block as the conversion reaches each block
    (``core.streamed_load``; ``stream`` False loads it whole first); pickled ``.bin`` weights load only with
    ``allow_pickle``. With an output folder, what is done is saved as it is done beside it (``rpq.resume``), and
    ``resume`` goes on from where a stopped run with the same source and settings stopped. ``head_index``: the
    converted model's LM head also gets a certified product-quantized index (``head_index``), fitted on the hidden
    states of the calibration windows and saved beside the weights. Streamed on a GPU, the converted blocks stay on
    that GPU where it has room (the rest in host memory): ``.to()`` the returned model before running it elsewhere.
    ``workers``: the processes the conversion is spread over (``core.workers``; every one of them calls this): they
    share the calibration, the fitting and the fine-tuning's windows; the leader alone indexes the head and writes the
    output, and the others return their model (the leader's, to float rounding) with ``output`` None.
    """
    workers = workers or Workers()
    calibration = calibration or CalibrationOptions()
    out = Path(output) if output is not None else None
    if out is not None:
        check_output_folder(out, force)
    validate_settings(settings)
    finetuning = finetuning or FinetuneSettings(steps=default_finetune_steps(settings.device), seed=settings.seed)
    _validate_options(calibration, finetuning)
    if head_index and not calibration.enabled:
        raise UserError("--head-index fits the index on the hidden states of calibration text: drop --calib none")
    text = calibration_text(calibration.text) if calibration.enabled else None
    source = resolve_source(model)
    if stream and not source.gguf_file:  # a run that may stream: large allocations mapped from the first empty build
        map_large_allocations()  # on, this check's included (core/host_heap.py says why)
    planned_layers(empty_model(load_config(source), dtype), settings)  # from the config alone: before the weights load
    if on_loading is not None:
        on_loading(source)
    opened = open_model(source, dtype, allow_pickle, stream)
    network, tokenizer = opened.model, opened.tokenizer
    if on_loaded is not None:
        on_loaded(source)
    params, original_bytes = model_params(network), model_bytes(network)

    planned_layers(network, settings)  # nothing to convert: say so before calibrating
    start = time.perf_counter()
    windows = _calibration(network, tokenizer, text, calibration, settings.device, finetuning.steps > 0) if text is not None else None
    teacher = Teacher() if windows is not None and finetuning.steps > 0 else None
    store = None
    if out is not None:
        store = ResumeStore.open(out, _fingerprint(source, settings, windows, finetuning, dtype, workers), resume, force,
                                 workers)
    record = teacher.record if teacher else None
    if teacher is not None and store is not None:
        saved = store.saved_teacher()  # a resumed run: the stopped run's, recorded already
        teacher, record = (saved, None) if saved is not None else (teacher, record)
        store.teacher = teacher
    with _work_kept_on_stop(store):
        conversion = convert_model(network, settings, windows, observer=observer, on_output=record,
                                   weights=opened.weights, store=store, workers=workers)
        if workers.spread and teacher is not None:  # each process saw its share of the fit windows: joined for all
            teacher = Teacher.joined(workers.gather(teacher), windows.fit.shape[0], windows_per_batch(windows.seq_len))
        report = None
        if teacher is not None:
            report = finetune(network, windows.fit, windows.held_out, teacher, finetuning, settings.device, on_finetune_step,
                              workers)
        indexed = head_index and windows is not None and workers.leader  # the leader indexes the head and writes
        certified = calibrated_index(network, windows.fit, settings.device) if indexed else None
        summary = summarize(
            conversion.outcomes,
            model_params=params,
            original_bytes=original_bytes,
            compressed_bytes=model_bytes(network),
            seconds=time.perf_counter() - start,
            budget_bits=None if settings.fixed else settings.budget,
            calibration=conversion.calibration,
            finetune=report.to_json() if report else None,
            input_file_bytes=disk_bytes(source),
            input_form=stored_form(source),
        )
        config = _config_section(conversion, settings, finetuning if report else None, source, network)
        attach_quantizer(network, config)
        if out is not None and workers.leader:
            write_folder_atomically(out, force, lambda tmp: _write(tmp, network, tokenizer, config, summary, conversion, certified))
            if store is not None:
                store.remove()
    apply_fusions(network)  # as the loader does: the model returned runs as the saved one loads
    return RPQRun(network, config, summary, source, out if workers.leader else None, conversion, report, certified)


@contextlib.contextmanager
def _work_kept_on_stop(store: ResumeStore | None) -> Iterator[None]:
    """Ctrl-C: where the work so far is kept and how to go on. The GPU running out of memory: one line that says so,
    what lowers the need, and, where work was saved, how to go on. With nothing saved yet, the folder goes too."""
    try:
        yield
    except KeyboardInterrupt:
        if not _holds_work(store):
            raise
        raise KeyboardInterrupt(f"{_kept(store)}: run the same command with --resume to go on") from None
    except torch.cuda.OutOfMemoryError as error:
        asked = re.search(r"Tried to allocate ([\d.]+ \w+)", str(error))
        what = f"the GPU ran out of memory ({f'{asked.group(1)} more were asked for' if asked else first_line(error)})"
        advice = ("each of --finetune-checkpointing on (while fine-tuning), a larger --max-gpu-memory and fewer other "
                  "processes on the GPU leaves this run more room")
        if not _holds_work(store):
            raise UserError(f"{what}: {advice}, as do fewer --calib-tokens") from None
        raise UserError(f"{what}; {_kept(store)}: {advice}; then run the same command with --resume to go on") from None


def _holds_work(store: ResumeStore | None) -> bool:
    """Whether a stopped run left work to resume; a store without any is removed."""
    if store is None:
        return False
    if store.holds_work:
        return True
    store.remove()
    return False


def _kept(store: ResumeStore) -> str:
    """Where a stopped run's work is, as both stop lines say it."""
    return f"the work so far ({len(store.finished)} layers fitted) is kept in '{store.folder}'"


def _fingerprint(source: ModelSource, settings: RPQSettings, windows: CalibrationSet | None, finetuning: FinetuneSettings,
                 dtype: torch.dtype | None, workers: Workers) -> dict:
    """What a resumed run must share with the stopped one for the two to make the same checkpoint (a spread run: also
    its number of processes, which shares out the calibration batches and the teacher's windows)."""
    location = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)
    spread = {"processes": workers.world} if workers.spread else {}
    return {**spread,
        "source": source.label,
        "source files": source_files(location) if location.exists() else None,
        "settings": {key: str(value) if isinstance(value, torch.device) else value for key, value in vars(settings).items()},
        "calibration windows": None if windows is None else digest(windows.fit),
        "held-out windows": None if windows is None else digest(windows.held_out),
        "fine-tuning": {"steps": finetuning.steps, "lr": finetuning.lr, "seed": finetuning.seed},
        "dtype": str(dtype),
        "tool version": __version__,
        "format version": FORMAT_VERSION,
    }


def _validate_options(calibration: CalibrationOptions, finetuning: FinetuneSettings) -> None:
    if calibration.tokens is not None and calibration.tokens < 1:
        raise UserError(f"--calib-tokens must be a positive number of tokens, got {calibration.tokens}")
    if calibration.seq_len is not None and calibration.seq_len < 2:
        raise UserError(f"--calib-seq-len must be at least 2, got {calibration.seq_len}")
    if finetuning.steps < 0:
        raise UserError(f"--finetune-steps must be 0 or more, got {finetuning.steps}")
    if finetuning.steps and not calibration.enabled:
        raise UserError("--finetune-steps needs calibration text: drop --calib none")
    if not finetuning.lr > 0:
        raise UserError(f"--finetune-lr must be positive, got {finetuning.lr}")
    check_checkpointing(finetuning.checkpointing)


def _calibration(
    network: nn.Module, tokenizer, text: Text, options: CalibrationOptions, device: torch.device, hold_out: bool
) -> CalibrationSet:
    if tokenizer is None:
        raise UserError("the model has no tokenizer, which calibration text needs (pass --calib none to fit without data)")
    context = context_length(network.config) or CALIBRATION_WINDOW
    seq_len = options.seq_len or min(CALIBRATION_WINDOW, context)
    if seq_len > context:
        raise UserError(f"--calib-seq-len {seq_len} is longer than the model's context ({context} tokens)")
    tokens = options.tokens or for_device(CALIBRATION_TOKENS, device)
    return calibration_set(tokenizer, text, seq_len, tokens, hold_out)


def _config_section(
    conversion: Conversion, settings: RPQSettings, finetuning: FinetuneSettings | None, source: ModelSource, network: nn.Module
) -> RPQConfig:
    layers = {}
    for outcome in conversion.outcomes:
        if isinstance(outcome, LayerResult):
            plan = outcome.plan
            spec = {"kind": plan.layer.kind, "shape": list(plan.layer.shape), **plan.format.to_json()}
            if plan.layer.kind == KIND_TIED_HEAD:
                spec["tied_to"] = plan.layer.tied_to
            if plan.rotation_block is not None:
                spec["rotation_block"] = plan.rotation_block
            layers[plan.layer.name] = spec
    dense = {o.layer.name: o.dense_reason for o in conversion.outcomes if not isinstance(o, LayerResult)}
    return RPQConfig(
        layers=layers,
        bits=None if settings.fixed else settings.budget,
        num_codebooks=settings.num_codebooks,
        codebook_size=settings.codebook_size,
        codebook_bits=settings.codebook_bits,
        rotation=settings.rotation_kind,
        rotation_block=settings.wanted_block if settings.rotation_kind != "none" else None,
        format_version=FORMAT_VERSION,
        skip=list(settings.skip),
        dense=dense,
        fit={
            "algorithm": "data-aware: k-means weighted by the input energy, codes by a column sweep with GPTQ-style "
            "error feedback, codebooks refitted by least squares on the output error"
            if conversion.calibration
            else "k-means of the weights (no calibration data)",
            "rounds": settings.fit_rounds,
            "formats": "any" if settings.any_format else "Linear layers: those with fast GPU kernels where the budget lies between their costs",
            "seed": settings.seed,
            "device": str(settings.device),
            "dtype": str(next(network.parameters()).dtype).removeprefix("torch."),
            "calibration": conversion.calibration,
            "finetune": None if finetuning is None else {"steps": finetuning.steps, "lr": finetuning.lr},
        },
        tool={"name": "model-compress", "version": __version__},
        base_model=source.to_json(),
    )


def _write(folder: Path, network: nn.Module, tokenizer, config: RPQConfig, summary: ConversionSummary, conversion: Conversion,
           certified: CertifiedForward | None = None) -> None:
    network.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    if certified is not None:
        save_index(folder, certified)
    summary.output_file_bytes = weights_bytes(folder)  # the card and the report say what was written
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / CARD_FILE).write_text(render_model_card(config, summary))
    report = {
        "settings": config.to_dict() | {"layers": None},
        "summary": summary.to_json(),
        "allocation": conversion.allocation.to_json() if conversion.allocation else None,
        "head_index": certified.describe() if certified is not None else None,
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
