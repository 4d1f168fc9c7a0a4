"""The host heap of a long streamed run: freed tensors given back to the system, not kept as fragmented heap.

glibc serves an allocation below its mmap threshold from the heap, and it raises that threshold (up to 32 MB) each
time a mapped block is freed. A conversion allocates and frees tens of megabytes per layer while small, long-lived
Python objects land between them, so the heap's top can never shrink: building a 24-block model empty (each weight
allocated, then moved to the meta device) left 930 MB of heap, and the process's address space grew with the number
of blocks although its resident memory did not. A fixed threshold keeps every allocation of ``MAPPED_FROM`` bytes or
more in its own mapping, returned whole when freed. Elsewhere (no glibc) these calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MAPPED_FROM = 4 << 20  # bytes: larger allocations get their own mapping (1 MB cost 10% more time on a CPU, 4 MB kept
# the same address space)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (``malloc_trim``). Without it a block's weights, freed after
    each block, leave about half their size behind in fragmented heap pages."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = MAPPED_FROM) -> None:
    """From now on, allocations of ``threshold`` bytes or more are mapped on their own (and the threshold stays)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, where this process has it (with both calls used here); None elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
