"""A safetensors checkpoint read tensor by tensor: the shards found, checked whole before any work, read lazily.

A conversion that streams a model reads one block's tensors at a time (``safe_open``, memory-mapped), so it must
know before it starts that every shard is there and complete: a missing or truncated shard found halfway through a
7B conversion costs the hour before it. ``open_checkpoint`` reads every shard's header (8 bytes of length, then
JSON) and compares the end of its last tensor with the file's size; that needs no tensor data.

A folder with only pickled ``.bin`` weights is refused unless the caller allows pickles: loading a pickle runs
whatever code it holds.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin.index.json")


@dataclass
class SafetensorsCheckpoint:
    """Where each tensor of a checkpoint lives (``files``: tensor name -> shard path), and open handles to read them."""

    folder: Path
    files: dict[str, Path]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self.files.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, as stored, copied onto ``device`` from the memory-mapped shard (only its bytes are paged in):
        a copy, so that nothing keeps the mapping once ``close`` drops it."""
        path = self.files[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle.get_tensor(name).to(device, copy=True)

    def close(self) -> None:
        """Unmap the shards read so far (their pages stop counting against the process)."""
        self._handles.clear()


def has_pickle_only(folder: Path) -> bool:
    """A folder whose weights are pickled ``.bin`` files and no safetensors."""
    if any(folder.glob("*.safetensors")):
        return False
    return any(path for pattern in PICKLE_PATTERNS for path in folder.glob(pattern))


def refuse_pickle(folder: Path, allow_pickle: bool) -> None:
    """One line, before anything loads, for a pickled checkpoint the user has not allowed."""
    if not allow_pickle and has_pickle_only(folder):
        raise UserError(
            f"'{folder}' holds only pickled .bin weights, and loading a pickle runs the code inside it; convert them "
            "to safetensors, or pass --allow-pickle if you trust the checkpoint"
        )


def open_checkpoint(folder: Path) -> SafetensorsCheckpoint | None:
    """The folder's safetensors checkpoint (sharded with an index, or one file), every shard checked complete;
    None where the folder has neither. A missing or truncated shard is a UserError naming it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot read the shard index '{index}': {error}") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
    elif (folder / SINGLE_FILE).is_file():
        files = {name: folder / SINGLE_FILE for name in _header(folder / SINGLE_FILE)}
    else:
        return None
    for shard in sorted(set(files.values())):
        stored = _header(shard)
        for name in (n for n, path in files.items() if path == shard):
            if name not in stored:
                raise UserError(f"shard '{shard.name}' of '{folder}' lacks tensor '{name}', which its index lists there")
    return SafetensorsCheckpoint(folder, files)


def _header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file describes, after checking that the file holds all their bytes."""
    if not path.is_file():
        raise UserError(f"shard '{path.name}' of '{path.parent}' is missing")
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise UserError(f"shard '{path.name}' of '{path.parent}' is not a readable safetensors file ({error})") from None
    tensors = {name: spec for name, spec in header.items() if name != "__metadata__"}
    end = max((spec["data_offsets"][1] for spec in tensors.values()), default=0)
    if 8 + length + end > size:
        raise UserError(
            f"shard '{path.name}' of '{path.parent}' is truncated: {size:,} bytes where its header needs {8 + length + end:,}"
        )
    return tensors
