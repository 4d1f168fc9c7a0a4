"""What the user asked ``compress rpq`` for, as one value, and the checks on it that need no model.

A bit budget, or fixed RPQ settings for every layer (rpq-pytorch's), the input rotation, what to skip and how
to fit; ``validate_settings`` refuses what cannot work before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import UserError
from .fit.defaults import DEFAULT_BITS, DEFAULT_ROTATION_BLOCK, DEFAULT_ROUNDS, for_device
from .kernels.layout import MAX_CODEBOOK_SIZE
from .kernels.rotation import BLOCK_SIZES, HADAMARD, NONE, ROTATIONS, block_for

DEFAULT_CODEBOOK_SIZE = 256  # with --codebooks: rpq-pytorch's K
BITS_RANGE = (1.0, 16.0)  # --bits must lie in (low, high]


@dataclass
class RPQSettings:
    """What the user asked for: a bit budget, or fixed RPQ settings for every layer; what to skip; how to fit.

    ``bits`` (the budget, bits per converted weight, everything stored counted) applies when neither
    ``num_codebooks`` nor ``codebook_size`` is given; those two fix M and K for every layer
    (rpq-pytorch's settings). ``codebook_bits``: 8 (int8 + one scale per codebook) or 16; None lets
    the budget choose per layer, and keeps the model's dtype with fixed settings. ``rotation``: "hadamard"
    or "none"; None rotates with a budget and not with fixed settings (rpq-pytorch's form, which its
    fast kernels read). ``rotation_block``: the Hadamard block wanted (None: the measured default).
    ``any_format``: a budget also offers Linear layers the formats without a fast GPU kernel (3-bit tables, 16-bit
    tables, vectors); by default they are offered only where the budget lies outside the fast formats' costs.
    """

    bits: float | None = None
    num_codebooks: int | None = None
    codebook_size: int | None = None
    codebook_bits: int | None = None
    rotation: str | None = None
    rotation_block: int | None = None
    any_format: bool = False
    skip: list[str] = field(default_factory=list)
    rounds: int | None = None  # None: the device's default (defaults.DEFAULT_ROUNDS)
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def fixed(self) -> bool:
        return self.num_codebooks is not None or self.codebook_size is not None

    @property
    def budget(self) -> float:
        return self.bits if self.bits is not None else DEFAULT_BITS

    @property
    def fit_rounds(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return for_device(DEFAULT_ROUNDS, self.device)

    @property
    def rotation_kind(self) -> str:
        """The rotation in effect: the one asked for, else Hadamard with a budget and none with fixed settings."""
        if self.rotation is not None:
            return self.rotation
        return NONE if self.fixed else HADAMARD

    @property
    def wanted_block(self) -> int:
        return self.rotation_block if self.rotation_block is not None else DEFAULT_ROTATION_BLOCK

    def block_for(self, width: int) -> int | None:
        """The rotation block of a ``width``-wide input under these settings (None: not rotated)."""
        return block_for(width, self.wanted_block) if self.rotation_kind == HADAMARD else None



def validate_settings(settings: RPQSettings) -> None:
    """The checks that need no model, so a caller can fail before the (slow) load."""
    if settings.bits is not None and settings.fixed:
        raise UserError("give either --bits (a budget) or --codebooks / --codebook-size (fixed settings), not both")
    if settings.bits is not None and not BITS_RANGE[0] < settings.bits <= BITS_RANGE[1]:
        raise UserError(f"--bits must be above {BITS_RANGE[0]:g} and at most {BITS_RANGE[1]:g}, got {settings.bits:g}")
    if settings.num_codebooks is not None and settings.num_codebooks < 1:
        raise UserError(f"--codebooks must be a positive integer, got {settings.num_codebooks}")
    if settings.codebook_size is not None and not 2 <= settings.codebook_size <= MAX_CODEBOOK_SIZE:
        raise UserError(f"--codebook-size must be between 2 and {MAX_CODEBOOK_SIZE}, got {settings.codebook_size}")
    if settings.codebook_bits not in (None, 8, 16):
        raise UserError(f"--codebook-bits must be 8 or 16, got {settings.codebook_bits}")
    if settings.rounds is not None and settings.rounds < 1:
        raise UserError(f"--rounds must be a positive integer, got {settings.rounds}")
    if settings.rotation is not None and settings.rotation not in ROTATIONS:
        raise UserError(f"--rotation must be one of {', '.join(ROTATIONS)}, got {settings.rotation!r}")
    if settings.rotation_block is not None and settings.rotation_block not in BLOCK_SIZES:
        raise UserError(f"--rotation-block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {settings.rotation_block}")

