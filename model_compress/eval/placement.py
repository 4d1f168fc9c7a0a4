"""Where ``compress eval`` puts a model: on its one device, or spread over several GPUs by accelerate's device map
when the model (original or compressed) outgrows one (``--gpus N``).

Spread, each decoder block stays whole on one GPU (the model's ``_no_split_modules``), the blocks are balanced over
the GPUs (accelerate's ``get_balanced_memory``), and accelerate's hooks move the activations between them. A tied
head reads the embedding's table, so it is put where the embedding is. Timing a spread model needs every GPU
synchronised (a CUDA event times one device's stream), its peak memory is the sum over the GPUs, and decoding from
a CUDA graph or compiled is left out (a graph captures one device's work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserError


@dataclass(frozen=True)
class Placement:
    """``device``: where the inputs go (the first GPU when spread); ``gpus``: how many GPUs the model is spread over."""

    device: torch.device
    gpus: int = 1

    @property
    def spread(self) -> bool:
        return self.gpus > 1

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` on its device, or spread over ``gpus`` GPUs from the first (``device``'s index) on."""
        if not self.spread:
            return model.to(self.device)
        first = self.device.index or 0
        free = {first + i: torch.cuda.mem_get_info(first + i)[0] for i in range(self.gpus)}
        return spread_model(model, device_map_for(model, free))


def device_map_for(model: nn.Module, max_memory: dict) -> dict[str, int | str]:
    """accelerate's device map of ``model`` balanced over the GPUs of ``max_memory`` (index -> bytes free): blocks kept
    whole, the tied head with the embedding. Built from sizes only, so it works for any keys, GPUs present or not."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    elsewhere = sorted({str(device) for device in device_map.values() if not isinstance(device, int)})
    if elsewhere:
        raise UserError(f"the model does not fit on {len(max_memory)} GPUs (accelerate would put part of it on "
                        f"{' and '.join(elsewhere)}); give more --gpus")
    return _head_beside_embedding(model, device_map)


def spread_model(model: nn.Module, device_map: dict[str, int | str]) -> nn.Module:
    """``model`` dispatched by ``device_map`` (accelerate's hooks move activations between devices)."""
    from accelerate import dispatch_model

    model = dispatch_model(model, device_map=device_map)
    # accelerate sets each tensor on its device without Module._apply; modules that keep state derived from their
    # tensors (the packed layers' launch plans) learn of the move through an _apply that changes nothing
    model._apply(lambda tensor: tensor)
    return model


def _head_beside_embedding(model: nn.Module, device_map: dict[str, int | str]) -> dict[str, int | str]:
    """A tied output head reads the input embedding's weights: give it the embedding's device."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return device_map
    names = {module: name for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs not in names or outputs not in names:
        return device_map
    embedding = _device_of(names[inputs], device_map)
    head = names[outputs]
    if embedding is None:
        return device_map
    placed = {name: device for name, device in device_map.items() if not (name == head or name.startswith(head + "."))}
    placed[head] = embedding
    return placed


def _device_of(name: str, device_map: dict[str, int | str]) -> int | str | None:
    """The device the map gives module ``name`` (its own entry or its nearest ancestor's)."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    return None


def model_devices(model: nn.Module) -> list[torch.device]:
    """The CUDA devices ``model`` is spread over (accelerate's ``hf_device_map``), else its parameters' one device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        indices = sorted({device for device in device_map.values() if isinstance(device, int)})
        if len(indices) > 1:
            return [torch.device("cuda", index) for index in indices]
    parameter = next(model.parameters(), None)
    return [parameter.device if parameter is not None else torch.device("cpu")]
