"""Open a model for conversion without reading its weights: built empty, its tensors read block by block later.

A safetensors checkpoint (a local folder, or a hub snapshot) is opened lazily: the model's modules on the meta
device (``sources.empty_model``), every shard checked complete, and a ``StreamedWeights`` that reads each block's
tensors when a pass runs it. Host memory then does not grow with the number of blocks. What cannot be streamed
loads whole, as before: a GGUF file (transformers dequantizes it whole), pickled ``.bin`` weights (only with
``allow_pickle``), and a checkpoint whose tensor names need transformers' per-architecture renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .block_weights import BlockWeights, StreamedWeights
from .errors import UserError
from .shards import SafetensorsCheckpoint, open_checkpoint, refuse_pickle
from .sources import DTYPES, ModelSource, empty_model, hub_access, load_config, load_model, load_tokenizer

SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]  # weights, config and tokenizer files


@dataclass
class OpenedModel:
    """A model to convert: ``weights`` says where its blocks' tensors come from (streamed, or in memory)."""

    model: nn.Module
    tokenizer: object | None
    weights: BlockWeights

    @property
    def streamed(self) -> bool:
        return isinstance(self.weights, StreamedWeights)


def open_model(source: ModelSource, dtype: torch.dtype | None, allow_pickle: bool, stream: bool = True) -> OpenedModel:
    """The model of ``source``, streamed where its checkpoint allows it (and ``stream``), else loaded whole."""
    folder = _local_folder(source)
    if folder is not None:
        refuse_pickle(folder, allow_pickle)
    checkpoint = open_checkpoint(folder) if folder is not None and stream else None  # every shard checked, before any work
    if checkpoint is not None:
        config = load_config(source)
        model = empty_model(config, dtype or _stored_dtype(config, checkpoint))
        weights = StreamedWeights.match(model, checkpoint)
        if weights is not None:
            with hub_access(source):
                tokenizer = load_tokenizer(source.path)
            return OpenedModel(model, tokenizer, weights)
    model, tokenizer = load_model(source, dtype, allow_pickle=allow_pickle)
    return OpenedModel(model, tokenizer, BlockWeights())


def _local_folder(source: ModelSource) -> Path | None:
    """Where the checkpoint's files are on this machine: the folder, or the hub snapshot (its weights, config and
    tokenizer files); None for a GGUF file or a hub id that cannot be fetched (the whole load then says why)."""
    if source.gguf_file:
        return None
    if source.kind != "hub":
        return Path(source.path)
    from huggingface_hub import snapshot_download

    try:
        with hub_access(source):
            return Path(snapshot_download(source.path, allow_patterns=SNAPSHOT_PATTERNS))
    except (UserError, OSError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - the hub client raises many types; the whole load reports the failure
        return None


def _stored_dtype(config, checkpoint: SafetensorsCheckpoint) -> torch.dtype:
    """The dtype the checkpoint says (its config), else that of its first floating tensor (as transformers' "auto")."""
    saved = DTYPES.get(str(getattr(config, "dtype", None)).removeprefix("torch."))
    if saved is not None:
        return saved
    for name in checkpoint.files:
        tensor = checkpoint.read(name)
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
