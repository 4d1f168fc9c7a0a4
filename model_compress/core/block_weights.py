"""Where a block's weights come from while a pass over the model runs it: memory, or the checkpoint on disk.

A pass (``rpq/fit/passes.py``) calls ``enter`` before it runs a block and ``leave`` after. In memory, a block
moves to the fitting device and back. Streamed, the model was built empty (accelerate's ``init_empty_weights``),
and ``enter`` reads the block's tensors from the safetensors shards straight onto the device; ``leave`` either
releases them (a pass that only measures: back to the meta device, no memory) or keeps the converted block (the
fitting pass: what is left of it after its layers were replaced). A converted block stays on the GPU it was fitted on
while that GPU keeps ``KEEP_FREE`` of its memory free after it (fine-tuning and the writer need it there anyway), and
goes to host memory otherwise. Host memory then holds the parts outside the blocks, one block, and only the converted
blocks the GPU could not keep: a 13B-class model converted at 4.5 bits is 7.3 GB, more than a small host should hold.
"""

from __future__ import annotations

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from . import gpu_memory
from .host_heap import return_freed_memory
from .shards import SafetensorsCheckpoint

META = torch.device("meta")
KEEP_FREE = 0.25  # of the GPU's memory, left free after a converted block is kept there: the next block, its states
# and fine-tuning's float32 copies of the codebooks need room beside the blocks kept


class BlockWeights:
    """The weights of a model held in memory: ``enter`` moves a block to the device, ``leave`` moves it back."""

    def __init__(self) -> None:
        self._homes: dict[str, torch.device] = {}

    def enter(self, block: nn.Module, name: str, device: torch.device) -> None:
        self._homes[name] = device_of(block)
        block.to(device)

    def leave(self, block: nn.Module, name: str, keep: bool) -> None:
        """After a block ran; ``keep`` False: nothing later needs its weights (in memory they stay anyway)."""
        block.to(self._homes.pop(name, torch.device("cpu")))

    def load_outside(self, model: nn.Module, stack_prefix: str) -> None:
        """Make everything outside the stack usable (in memory: it already is)."""

    def load_all(self, model: nn.Module) -> None:
        """Make every tensor usable (in memory: it already is)."""


class StreamedWeights(BlockWeights):
    """The weights of an empty model read from a checkpoint block by block (``keys``: model tensor -> stored name)."""

    def __init__(self, model: nn.Module, checkpoint: SafetensorsCheckpoint, keys: dict[str, str]) -> None:
        super().__init__()
        self.model, self.checkpoint, self.keys = model, checkpoint, keys

    @classmethod
    def match(cls, model: nn.Module, checkpoint: SafetensorsCheckpoint) -> StreamedWeights | None:
        """Every parameter of ``model`` found in ``checkpoint`` (as named, or with or without the base model's
        prefix; a tied copy needs only its first name); None where one is not, so the caller loads the model
        whole through transformers, which knows each architecture's renamings."""
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # a tied head is stored once: it must share its embedding's tensor to be found
        prefix = getattr(model, "base_model_prefix", "") or ""
        keys: dict[str, str] = {}
        found: set[int] = set()
        parameters = list(model.named_parameters(remove_duplicate=False))
        for name, tensor in [*parameters, *model.named_buffers()]:
            stored = _stored_name(name, prefix, checkpoint)
            if stored is not None:
                keys[name] = stored
                found.add(id(tensor))
        if any(id(tensor) not in found for _, tensor in parameters):
            return None
        return cls(model, checkpoint, keys)

    def load(self, prefix: str, device: torch.device, skip: str | None = None) -> None:
        """Read every tensor under ``prefix`` (a module name with its dot; "" for all) onto ``device``, in the dtype
        the empty model gave it; tensors under ``skip`` are left alone."""
        for name, stored in self.keys.items():
            if not name.startswith(prefix) or (skip and name.startswith(skip)):
                continue
            current = _current(self.model, name)
            if current is None:  # its layer was replaced (a converted layer put back by a resumed run)
                continue
            if isinstance(current, nn.Parameter) and current.device != META:  # already read (or replaced)
                continue
            set_module_tensor_to_device(self.model, name, device, value=self.checkpoint.read(stored, device),
                                        dtype=current.dtype, clear_cache=False)
        self.checkpoint.close()

    def release(self, prefix: str) -> None:
        """Every parameter under ``prefix`` back to the meta device: no memory."""
        for name, _ in list(self.model.named_parameters()):
            if name.startswith(prefix):
                set_module_tensor_to_device(self.model, name, META, clear_cache=False)

    def load_outside(self, model: nn.Module, stack_prefix: str) -> None:
        self.load("", torch.device("cpu"), skip=f"{stack_prefix}." if stack_prefix else None)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # a head tied to the embedding shares the tensor just read (it is stored once)

    def load_all(self, model: nn.Module) -> None:
        self.load("", torch.device("cpu"))
        if hasattr(model, "tie_weights"):
            model.tie_weights()

    def enter(self, block: nn.Module, name: str, device: torch.device) -> None:
        if any(p.device == META for p in block.parameters()):
            self.load(f"{name}.", device)
        block.to(device)

    def leave(self, block: nn.Module, name: str, keep: bool) -> None:
        if keep:
            block.to(kept_home(device_of(block)))
        else:
            self.release(f"{name}.")
        return_freed_memory()


def kept_home(device: torch.device, free_and_total: tuple[int, int] | None = None) -> torch.device:
    """Where a converted block now on ``device`` is kept: that GPU, where ``KEEP_FREE`` of it stays free with the block
    there (it is there already, so its bytes count as used), else host memory. ``free_and_total``: tests give them."""
    if device.type != "cuda":
        return torch.device("cpu")
    if free_and_total is None:
        figures = gpu_memory.read(device)  # within --max-gpu-memory
        free_and_total = figures.usable, figures.limit
    free, total = free_and_total
    return device if free >= KEEP_FREE * total else torch.device("cpu")


def _stored_name(name: str, prefix: str, checkpoint: SafetensorsCheckpoint) -> str | None:
    candidates = [name]
    if prefix:
        candidates.append(f"{prefix}.{name}")
        if name.startswith(f"{prefix}."):
            candidates.append(name[len(prefix) + 1 :])
    return next((c for c in candidates if c in checkpoint), None)


def _current(model: nn.Module, name: str) -> torch.Tensor | None:
    """The model's tensor of that name, or None where its module no longer has it."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        return owner._parameters[leaf]
    return owner._buffers.get(leaf)


def device_of(module: nn.Module) -> torch.device:
    """Where a module's first tensor lives (the CPU for a module without any)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")
