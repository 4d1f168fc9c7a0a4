"""How much of a GPU a run may use, and what is free of it.

``--max-gpu-memory`` caps what this process takes of a GPU, so that a conversion behaves as it would on a smaller
card (a 24 GB one, say) or leaves room for other work on a shared one. torch's caching allocator enforces the cap
itself (``set_per_process_memory_fraction``: an allocation beyond it first releases cached blocks, then fails), and
every choice made from free memory (where calibration states live, whether fine-tuning recomputes blocks, whether
converted blocks stay on the GPU) reads it back from torch through ``read``: no setting has to travel to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import convert_file_size_to_int

from .errors import UserError


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU's figures, in bytes: free on the device, its total, what torch's allocator holds (reserved) and uses
    of that (allocated), and the fraction of the total this process may hold (1.0 without a cap)."""

    free: int
    total: int
    reserved: int = 0
    allocated: int = 0
    fraction: float = 1.0

    @property
    def limit(self) -> int:
        """The most this process may hold: the whole GPU, or the cap."""
        return int(self.total * self.fraction)

    @property
    def usable(self) -> int:
        """What new tensors may still fill: free memory plus the allocator's cached but unused blocks (it releases
        them to make room for a larger one), within the cap."""
        return max(0, min(self.free + self.reserved - self.allocated, self.limit - self.allocated))


def read(device: torch.device) -> DeviceMemory:
    """The figures of a CUDA ``device`` now, with the cap this process set on it."""
    device = _indexed(device)
    free, total = torch.cuda.mem_get_info(device)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch 2.9 and later
    fraction = getter(device) if getter is not None else 1.0
    return DeviceMemory(free, total, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device), fraction)


def parse_size(text: str) -> int:
    """Bytes of a size a user typed (24GB, 20GiB, 512MB), by accelerate's reading of units."""
    try:
        size = convert_file_size_to_int(text.strip())
    except (ValueError, AttributeError):
        size = -1
    if size <= 0:
        raise UserError(f"--max-gpu-memory {text!r}: give a size with its unit, such as 24GB or 20GiB")
    return size


def cap(device: torch.device, size: int | None) -> None:
    """Limit this process to ``size`` bytes (``parse_size``'s) of the CUDA ``device``; None: no cap."""
    if size is None:
        return
    if device.type != "cuda":
        raise UserError(f"--max-gpu-memory caps a CUDA device's memory; this run is on {device.type} (pass --device cuda)")
    device = _indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    if size > total:
        raise UserError(f"--max-gpu-memory {size / 1e9:.1f} GB: {device} has {total / 1e9:.1f} GB in all")
    torch.cuda.set_per_process_memory_fraction(size / total, device)


def _indexed(device: torch.device) -> torch.device:
    """'cuda' as 'cuda:N' of the current GPU: torch's fraction calls want an index."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def peak_note(device: torch.device, capped: int | None) -> str:
    """' (peak GPU memory ..., within a cap of ...)' for the command's last line; '' off CUDA."""
    if device.type != "cuda":
        return ""
    within = f" of the {capped / 1e9:.1f} GB allowed" if capped is not None else ""
    return f" (peak GPU memory {torch.cuda.max_memory_reserved(device) / 1e9:.1f} GB{within})"
