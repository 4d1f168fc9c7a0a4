"""Does `compress rpq` stay within one model plus one layer? Resident memory phase by phase (Linux).

    python benchmarks/rpq/conversion_memory.py [--codebooks 32] [--iters 25] [MODEL]

Loads the model (default: the embedded SmolLM2-135M), then converts and saves it through the
library, reading the process's resident set (VmRSS) after each phase and its peak (VmHWM) during
each phase, the peak counter being reset between phases (/proc/self/clear_refs). A conversion that
held a second copy of the model would peak at about twice the loaded size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

import torch


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--codebooks", type=int, default=32)
    parser.add_argument("--iters", type=int, default=25)
    args = parser.parse_args()

    import transformers

    from model_compress.rpq.convert import ConversionObserver, RPQSettings
    from model_compress.rpq.pipeline import compress_rpq

    transformers.utils.logging.set_verbosity_error()
    marks: dict[str, float] = {"start": time.perf_counter()}
    baseline = status_mb("VmRSS")

    def loaded(source) -> None:
        marks.update(loaded=time.perf_counter(), after_load=status_mb("VmRSS"), load_peak=status_mb("VmHWM"))
        reset_peak()

    class PhasePeaks(ConversionObserver):
        """Reads the conversion's peak when the last layer is done, then starts the save phase afresh."""

        def started(self, plans) -> None:
            self.left = sum(plan.converted for plan in plans)

        def layer_finished(self, result) -> None:
            self.left -= 1
            if self.left == 0:
                marks.update(converted=time.perf_counter(), convert_peak=status_mb("VmHWM"), after_convert=status_mb("VmRSS"))
                reset_peak()

    with tempfile.TemporaryDirectory() as scratch:
        run = compress_rpq(
            args.model, Path(scratch) / "out", RPQSettings(num_codebooks=args.codebooks, max_iter=args.iters),
            observer=PhasePeaks(), on_loaded=loaded,
        )
    save_peak, done = status_mb("VmHWM"), time.perf_counter()
    dense_mb = run.summary.original_bytes / 1e6
    after_load = marks["after_load"]
    load_s, convert_s, save_s = marks["loaded"] - marks["start"], marks["converted"] - marks["loaded"], done - marks["converted"]
    load_peak, convert_peak, after_convert = marks["load_peak"], marks["convert_peak"], marks["after_convert"]

    print(f"# conversion memory, {args.model or 'SmolLM2-135M (default)'}, --codebooks {args.codebooks} --iters "
          f"{args.iters}, CPU, {torch.get_num_threads()} threads; {date.today()}")
    print(f"dense weights {dense_mb:.0f} MB; process before loading {baseline:.0f} MB")
    print("| phase | seconds | RSS after MB | peak during MB | peak above RSS after load, in dense-model sizes |")
    print("|---|---|---|---|---|")
    print(f"| load | {load_s:.0f} | {after_load:.0f} | {load_peak:.0f} | - |")
    print(f"| convert | {convert_s:.0f} | {after_convert:.0f} | {convert_peak:.0f} | {(convert_peak - after_load) / dense_mb:.2f} |")
    print(f"| save | {save_s:.0f} | - | {save_peak:.0f} | {(save_peak - after_load) / dense_mb:.2f} |")


if __name__ == "__main__":
    main()
