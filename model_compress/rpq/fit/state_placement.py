"""Where a pass keeps its calibration states: each window's inputs to the current block, and its outputs.

On the fitting GPU a pass needs them at once for a block: the inputs, the outputs the block makes from them and the
block's own work (its activations, the layers' second moments, the fitting). For a 7B-class model and the default
262,144 calibration tokens the states are 2 GB in float16 (4 GB in float32), for a 70B-class one twice that, and
they double while a block runs. Where ``STATE_HEADROOM`` times their size does not fit the GPU's free memory (within
``--max-gpu-memory``) when the first window is captured, they are kept in pinned host memory instead and each window
is moved to the GPU for its block call and back: slower (two copies per window per block), but the GPU then holds one
window at a time. The choice and its figures are handed to the observer, and the conversion report keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core import gpu_memory

STATE_HEADROOM = 3.0  # inputs + outputs + the block's own work, measured against the free memory


@dataclass(frozen=True)
class StatePlacement:
    """The decision: where the states live, their estimated bytes, the GPU's free bytes when decided (None off CUDA)."""

    home: torch.device
    state_bytes: int
    free_bytes: int | None

    @property
    def spilled(self) -> bool:
        return self.free_bytes is not None and self.home.type == "cpu"

    def describe(self) -> str:
        size = f"{self.state_bytes / 2**30:.2f} GiB of calibration states"
        if self.free_bytes is None:
            return f"{size} in {self.home.type} memory"
        where = "host memory (moved to the GPU one window at a time)" if self.spilled else "GPU memory"
        return f"{size} kept in {where}: {self.free_bytes / 2**30:.1f} GiB of the GPU were free"

    def to_json(self) -> dict:
        return {"home": str(self.home), "state_bytes": self.state_bytes, "free_bytes": self.free_bytes, "spilled": self.spilled}


class StatePlacer:
    """Decides once, from the first window captured, where all ``windows`` of a pass are kept."""

    def __init__(self, device: torch.device, windows: int, free_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        self.windows = windows
        self._free_override = free_bytes  # tests: a GPU's free memory, given
        self.decision: StatePlacement | None = None

    def home(self, first_window_bytes: int) -> torch.device:
        """Where to keep the states (decided on the first call, the same after)."""
        if self.decision is None:
            estimate = first_window_bytes * self.windows
            free = self._free_override
            if free is None and self.device.type == "cuda":
                free = gpu_memory.read(self.device).usable
            spill = free is not None and STATE_HEADROOM * estimate > free
            self.decision = StatePlacement(torch.device("cpu") if spill else self.device, estimate, free)
        return self.decision.home
