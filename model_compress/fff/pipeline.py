"""`compress fff-distill` as one library call: load, record, fit a tree per block, distil, save the folder whole."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..core.version import __version__
from ..core.checkpoint import CARD_FILE, MAX_SHARD_SIZE, REPORT_FILE, check_output_folder, weights_bytes, write_folder_atomically
from ..core.text import Text
from ..core.errors import UserError
from ..core.sources import MINILM, ModelSource, context_length, disk_bytes, empty_model, load_config, load_model, resolve_source, stored_form
from ..core.sizes import model_bytes, model_params
from .blocks import Block, dense_weights, find_blocks, install_tree, intermediate_size, refuse_unsupported, select_blocks
from .capture import calibration_windows, record_blocks
from .distill import BlockResult, FFFSettings, check_depth, distill_end_to_end, fit_block, validate_settings
from .quantizer import FFFConfig, attach_fff, tree_spec
from .allocate import ModelProbe, candidate_shares, choose_shares, measure
from .summary import DistillSummary, render_model_card

MIN_CALIBRATION_TOKENS = 512
TOKENS_PER_LEAF = 16  # the calibration tokens each leaf needs at least: the last routers learn from two leaves' tokens


class DistillObserver(Protocol):
    def stage(self, description: str, total: int | None) -> None: ...
    def advance(self, amount: int = 1) -> None: ...
    def block_finished(self, result: BlockResult) -> None: ...


class SilentObserver:
    def stage(self, description: str, total: int | None) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass

    def block_finished(self, result: BlockResult) -> None:
        pass


@dataclass
class FFFRun:
    """What a run produced: the distilled model (in memory, eval mode), its config section and figures."""

    model: nn.Module
    config: FFFConfig
    summary: DistillSummary
    source: ModelSource
    output: Path | None


def distill_fff(
    model: str | None,
    output: str | Path | None,
    settings: FFFSettings,
    calibration: Text,
    *,
    force: bool = False,
    observer: DistillObserver | None = None,
    on_loading: Callable[[ModelSource], None] | None = None,
    on_loaded: Callable[[ModelSource], None] | None = None,
) -> FFFRun:
    """Load ``model`` (None: the embedded MiniLM), replace its FF blocks with trees, save to ``output``."""
    observer = observer or SilentObserver()
    out = Path(output) if output is not None else None
    if out is not None:
        check_output_folder(out, force)
    validate_settings(settings)
    source = resolve_source(model, MINILM)
    # from the config alone, before the weights load: the blocks are named, so the loaded model has the same ones
    blocks = check_blocks(empty_model_of(source), settings)
    if on_loading is not None:
        on_loading(source)
    network, tokenizer = load_model(source)
    if tokenizer is None:
        raise UserError(f"'{source.label}' has no tokenizer, which the calibration text needs")
    if on_loaded is not None:
        on_loaded(source)
    saved_dtype = settings.saved_dtype or next(network.parameters()).dtype
    params, original_bytes = model_params(network), model_bytes(network)
    # nn.Module.to, not the model's own: transformers refuses .float() on a GGUF-loaded (dequantized) model
    network = nn.Module.to(network, settings.device, torch.float32)

    began = time.perf_counter()
    seq_len = min(settings.seq_len, context_length(network.config) or settings.seq_len)
    needed = max(MIN_CALIBRATION_TOKENS, TOKENS_PER_LEAF * 2**settings.depth)
    why = f" ({TOKENS_PER_LEAF} per leaf of a depth-{settings.depth} tree, so that every router has tokens to learn from)" if needed > MIN_CALIBRATION_TOKENS else ""
    windows = calibration_windows(tokenizer, calibration, seq_len, max(settings.calib_tokens, needed), needed, why)
    teacher = copy.deepcopy(network) if settings.e2e_steps > 0 else None
    observer.stage(f"recording {len(blocks)} FF blocks on {windows.tokens:,} calibration tokens", windows.input_ids.shape[0])
    records = record_blocks(network, blocks, windows, settings.device, advance=observer.advance)

    shares = _block_shares(network, blocks, records, windows, settings, observer)
    results: list[BlockResult] = []
    specs: dict[str, dict] = {}
    for block, share in zip(blocks, shares):
        observer.stage(f"{block.owner}: fitting a depth-{settings.depth} tree", settings.steps)
        block_settings = replace(settings, neurons_per_token=share)
        tree, result = fit_block(block.owner, block.index, dense_weights(network, block), records.pop(block.index), block_settings, observer.advance)
        specs[block.replaced_name] = tree_spec(block, tree, result.neurons)
        install_tree(network, block, tree)
        results.append(result)
        observer.block_finished(result)

    summary = DistillSummary(
        results, params, model_params(network), original_bytes, 0,
        {"name": calibration.name, "source": calibration.source, "tokens": windows.tokens, "windows": windows.input_ids.shape[0],
         "seq_len": seq_len, "holdout": settings.holdout},
        0.0,
    )
    if teacher is not None:
        observer.stage("end-to-end distillation", settings.e2e_steps)
        trees = [network.get_submodule(name) for name in specs]
        summary.e2e_before, summary.e2e_after = distill_end_to_end(network, teacher, trees, windows, settings, observer.advance)
        summary.e2e_loss = "KL(original || distilled) per token" if _has_logits(network) else "1 - cosine of mean-pooled embeddings"
        del teacher
    network = nn.Module.to(network, "cpu", saved_dtype).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    summary.distilled_bytes = model_bytes(network)
    summary.seconds = time.perf_counter() - began
    summary.input_file_bytes, summary.input_form = disk_bytes(source), stored_form(source)

    config = FFFConfig(
        blocks=specs,
        settings=settings.to_json(),
        fit={"calibration": summary.calibration, "dtype": str(saved_dtype).removeprefix("torch.")},
        tool={"name": "model-compress", "version": __version__},
        base_model=source.to_json(),
    )
    attach_fff(network, config)
    if out is not None:
        write_folder_atomically(out, force, lambda tmp: _write(tmp, network, tokenizer, config, summary, source))
    return FFFRun(network, config, summary, source, out)


def empty_model_of(source: ModelSource) -> nn.Module:
    """The model's modules without weights, after the config-level refusals."""
    config = load_config(source)
    refuse_unsupported(config)
    return empty_model(config)


def check_blocks(network: nn.Module, settings: FFFSettings) -> list[Block]:
    """The blocks ``settings.layers`` selects, each checked to be deep enough for ``settings.depth``."""
    blocks = select_blocks(find_blocks(network), settings.layers)
    for block in blocks:
        check_depth(settings, intermediate_size(network, block), block.owner)
    return blocks


def _has_logits(model: nn.Module) -> bool:
    return model.get_output_embeddings() is not None


def _block_shares(network: nn.Module, blocks, records, windows, settings: FFFSettings, observer) -> list[float | None]:
    """The share of neurons each block keeps: the asked one everywhere, or measured and allocated (``allocate``)."""
    if settings.neurons_per_token is None or not settings.allocate or len(blocks) < 2:
        return [settings.neurons_per_token] * len(blocks)
    options = len(candidate_shares(settings))
    observer.stage(f"measuring the model with each of {len(blocks)} blocks as a tree at {options} shares", len(blocks) * options)
    probe = ModelProbe(network, windows, settings.device)
    measured = [
        measure(network, block, dense_weights(network, block), records[block.index], settings, probe, observer.advance)
        for block in blocks
    ]
    return choose_shares(measured, settings.neurons_per_token)


def _write(folder: Path, network: nn.Module, tokenizer, config: FFFConfig, summary: DistillSummary, source: ModelSource) -> None:
    network.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    summary.output_file_bytes = weights_bytes(folder)  # the card and the report say what was written
    tokenizer.save_pretrained(folder)
    (folder / CARD_FILE).write_text(render_model_card(source.label, config.settings, summary))
    report = {"settings": config.to_dict() | {"blocks": None}, "summary": summary.to_json()}
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))

