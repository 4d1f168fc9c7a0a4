"""The largest single allocations a `compress` command makes, found on a CPU before a GPU run meets them.

    python benchmarks/rpq/largest_allocations.py [--min-mb 100] [--top 30] -- rpq MODEL -o OUT --device cpu ...

Runs the command in this process under torch's profiler (``profile_memory=True``, shapes recorded) and lists the
operators whose single allocation was largest, with their input shapes, biggest first. A 7B-class model's memory
spikes show up on a model of a few hundred MB with the same vocabulary or widths: a 2-block Llama with a 49,152-row
vocabulary showed `pack_stream`'s bit-expanded codes at 32 bytes a weight of the head, which asked an H100 held to
24 GB for 6 GiB at once. CPU only: the CUDA allocator's own history (``torch.cuda.memory._record_memory_history``)
is the tool on a GPU.
"""

from __future__ import annotations

import argparse
import sys

from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner


def largest(events, min_bytes: float, top: int) -> list[tuple[int, str, str]]:
    """(bytes, operator, input shapes) of the ``top`` largest distinct allocations of at least ``min_bytes``."""
    found: dict[tuple[int, str, str], None] = {}
    for event in sorted((e for e in events if e.cpu_memory_usage >= min_bytes), key=lambda e: -e.cpu_memory_usage):
        found.setdefault((event.cpu_memory_usage, event.name, str(event.input_shapes)), None)
        if len(found) >= top:
            break
    return list(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-mb", type=float, default=100.0, help="smallest allocation listed, in MB")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the compress command's arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the compress command after --")
    from model_compress.cli.app import app

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as profiler:
        result = CliRunner().invoke(app, command)
    print(result.output[-2000:])
    for size, name, shapes in largest(profiler.events(), args.min_mb * 1e6, args.top):
        print(f"{size / 1e6:10.1f} MB  {name}  {shapes[:160]}")
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
