"""`compress rpq` as one library call: load, convert layer by layer, save the folder whole."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..checkpoint import CARD_FILE, MAX_SHARD_SIZE, REPORT_FILE, check_output_folder, write_folder_atomically
from ..models import ModelSource, load_model, resolve_source
from .convert import ColumnImportance, ConversionObserver, LayerResult, RPQSettings, convert_model, validate_settings
from .hf_integration import RPQConfig, attach_quantizer
from .model_card import render_model_card
from .summary import ConversionSummary, model_bytes, model_params, summarize


@dataclass
class RPQRun:
    """What a run produced: the model (converted, in memory), its config section and the figures."""

    model: nn.Module
    config: RPQConfig
    summary: ConversionSummary
    source: ModelSource
    output: Path | None


def compress_rpq(
    model: str | None,
    output: str | Path | None,
    settings: RPQSettings,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    observer: ConversionObserver | None = None,
    importance: ColumnImportance | None = None,
    on_loaded: Callable[[ModelSource], None] | None = None,
) -> RPQRun:
    """Load ``model`` (None: the embedded default), convert it, and save it to ``output`` (if given).

    The output folder is checked before the (long) work starts and written atomically at the end.
    ``on_loaded(source)`` is called once the original is in memory (the CLI uses it for status).
    """
    out = Path(output) if output is not None else None
    if out is not None:
        check_output_folder(out, force)
    validate_settings(settings)
    source = resolve_source(model)
    network, tokenizer = load_model(source, dtype)
    if on_loaded is not None:
        on_loaded(source)
    params, original_bytes = model_params(network), model_bytes(network)

    start = time.perf_counter()
    outcomes = convert_model(network, settings, observer=observer, importance=importance)
    summary = summarize(
        outcomes,
        model_params=params,
        original_bytes=original_bytes,
        compressed_bytes=model_bytes(network),
        seconds=time.perf_counter() - start,
    )
    config = _config_section(outcomes, summary, settings, source, network)
    attach_quantizer(network, config)
    if out is not None:
        write_folder_atomically(out, force, lambda tmp: _write(tmp, network, tokenizer, config, summary))
    return RPQRun(network, config, summary, source, out)


def _config_section(
    outcomes, summary: ConversionSummary, settings: RPQSettings, source: ModelSource, network: nn.Module
) -> RPQConfig:
    layers = {}
    for outcome in outcomes:
        if isinstance(outcome, LayerResult):
            plan = outcome.plan
            spec = {"kind": plan.layer.kind, "num_codebooks": plan.num_codebooks, "codebook_size": plan.codebook_size}
            if plan.layer.tied_to:
                spec["tied_to"] = plan.layer.tied_to
            layers[plan.layer.name] = spec
    return RPQConfig(
        layers=layers,
        num_codebooks=settings.num_codebooks,
        codebook_size=settings.codebook_size,
        skip=list(settings.skip),
        dense=dict(summary.dense_layers),
        fit={
            "algorithm": "k-means (greedy k-means++ seeding, Lloyd)",
            "seed": settings.seed,
            "max_iter": settings.max_iter,
            "tol": settings.tol,
            "device": str(settings.device),
            "dtype": str(next(network.parameters()).dtype).removeprefix("torch."),
        },
        tool={"name": "model-compress", "version": __version__},
        base_model=source.to_json(),
    )


def _write(folder: Path, network: nn.Module, tokenizer, config: RPQConfig, summary: ConversionSummary) -> None:
    network.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / CARD_FILE).write_text(render_model_card(config, summary))
    report = {"settings": config.to_dict() | {"layers": None}, "summary": summary.to_json()}
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
