"""Where each tensor of a model lives, and putting them back there.

A streamed conversion keeps converted blocks on the GPU and the rest in host memory; work that needs the whole model
on one device (fine-tuning, indexing the head) moves it there and then returns each tensor where it was, one at a
time: moving the whole model back to a single device could overflow the host.
"""

from __future__ import annotations

import torch
from torch import nn


def tensor_devices(model: nn.Module) -> dict[str, torch.device]:
    """Every parameter's and buffer's device, by name."""
    return {name: t.device for name, t in [*model.named_parameters(), *model.named_buffers()]}


def return_tensors(model: nn.Module, devices: dict[str, torch.device]) -> None:
    """Every tensor back on the device ``tensor_devices`` found it on. Callers that keep state derived from the
    tensors (launch plans) drop it after."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            home = devices.get(name)
            if home is not None and tensor.device != home:
                tensor.data = tensor.data.to(home)
