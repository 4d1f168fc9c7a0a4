"""Run one `compress` command in a child process and report its wall time and peak memory.

A child of its own means the peak RSS and the CUDA allocator peaks belong to that command alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from model_compress.cli.app import app
code = 1
try:
    code = app(sys.argv[1:], standalone_mode=False) or 0  # the command's exit code (not raised in this mode)
finally:
    try:  # this process's own peak: ru_maxrss keeps the parent's peak across the exec
        peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    except OSError:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures = {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_kb / 1024, "exit_code": code}
    import torch
    if torch.cuda.is_initialized():
        figures["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        figures["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    print("BENCH " + json.dumps(figures))
"""


def run_timed_cli(*args: str, echo: bool = False) -> dict:
    """`compress ARGS...` in a fresh interpreter (imports included in the time); raises if it fails.

    ``echo`` prints the command's own output (its table) before the figures.
    """
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("BENCH ")), None)
    figures = json.loads(line[len("BENCH ") :]) if line else {}
    if done.returncode != 0 or figures.get("exit_code", 0) != 0:
        raise RuntimeError(f"compress {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if echo:
        print("\n".join(l for l in done.stdout.splitlines() if not l.startswith("BENCH ")))
    return figures


if __name__ == "__main__":  # python benchmarks/rpq/timed_cli.py rpq -o out/ ...: the command's output, then its figures
    print(json.dumps(run_timed_cli(*sys.argv[1:], echo=True)))
