"""Checkpoints of an earlier RPQ format, brought to this one when loaded (the tensors on disk stay as they are).

Format 3 stores 5-bit codes over a multiple of 32 columns as a 4-bit and a 1-bit plane (``layout.stored_as_planes``);
formats 1 and 2 stored every width as one stream. A loaded format-2 model gets its codes repacked in memory (same
bytes per row) and saves as format 3.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels.layout import planes_from_stream
from .layers.modules import _Codes


def upgrade_codes(model: nn.Module, format_version: int) -> int:
    """Repack the codes of every RPQ layer of ``model`` read from a checkpoint of ``format_version``; returns how many
    layers changed."""
    if format_version >= 3:
        return 0
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _Codes):
                repacked = planes_from_stream(module.indices, module.code_bits, module.columns)
                if repacked is not module.indices:
                    module.indices.copy_(repacked)
                    changed += 1
    return changed
