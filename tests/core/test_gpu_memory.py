"""The GPU memory figures every free-memory choice reads, with and without --max-gpu-memory's cap."""

import pytest
import torch

from model_compress.core import gpu_memory
from model_compress.core.block_weights import KEEP_FREE, kept_home
from model_compress.core.errors import UserError

GB = 10**9


def test_without_a_cap_free_memory_counts_the_allocators_unused_blocks():
    figures = gpu_memory.DeviceMemory(free=30 * GB, total=80 * GB, reserved=20 * GB, allocated=12 * GB)
    assert figures.limit == 80 * GB
    assert figures.usable == 38 * GB  # 30 free on the device + 8 cached, unused


def test_a_cap_bounds_what_is_usable_whatever_the_device_has_free():
    figures = gpu_memory.DeviceMemory(free=60 * GB, total=80 * GB, reserved=20 * GB, allocated=12 * GB, fraction=0.3)
    assert figures.limit == 24 * GB
    assert figures.usable == 12 * GB  # the cap less what tensors hold, not the 60 GB the device has free
    full = gpu_memory.DeviceMemory(free=60 * GB, total=80 * GB, reserved=26 * GB, allocated=25 * GB, fraction=0.3)
    assert full.usable == 0


@pytest.mark.parametrize("text,size", [("24GB", 24 * GB), ("20GiB", 20 * 2**30), ("512MB", 512 * 10**6), (" 1.5GB", 15 * 10**8)])
def test_sizes_with_their_units(text, size):
    assert gpu_memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["24", "lots", "-1GB", "0GB", ""])
def test_a_size_without_a_unit_or_below_zero_is_refused(text):
    with pytest.raises(UserError, match="24GB or 20GiB"):
        gpu_memory.parse_size(text)


def test_no_cap_asked_touches_nothing_and_a_cap_needs_cuda():
    gpu_memory.cap(torch.device("cpu"), None)  # nothing asked: nothing refused, nothing set
    with pytest.raises(UserError, match="on cpu"):
        gpu_memory.cap(torch.device("cpu"), 24 * GB)
    assert gpu_memory.peak_note(torch.device("cpu"), None) == ""


def test_converted_blocks_stay_on_a_gpu_only_with_room_left_under_the_cap():
    cuda = torch.device("cuda", 0)
    capped = gpu_memory.DeviceMemory(free=60 * GB, total=80 * GB, reserved=20 * GB, allocated=20 * GB, fraction=0.3)
    assert capped.usable < KEEP_FREE * capped.limit
    assert kept_home(cuda, (capped.usable, capped.limit)).type == "cpu"
    roomy = gpu_memory.DeviceMemory(free=60 * GB, total=80 * GB, reserved=10 * GB, allocated=8 * GB, fraction=0.3)
    assert kept_home(cuda, (roomy.usable, roomy.limit)) == cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cap_is_read_back_from_torchs_allocator():
    device = torch.device("cuda", 0)
    before = torch.cuda.get_per_process_memory_fraction(device)
    try:
        gpu_memory.cap(device, gpu_memory.parse_size("2GB"))
        figures = gpu_memory.read(device)
        assert abs(figures.limit - 2 * GB) < 2**20
        assert figures.usable <= 2 * GB
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(3 * GB, dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)
