#!/usr/bin/env bash
# A streamed conversion on CUDA, stopped with Ctrl-C (SIGINT) and resumed, against the same conversion loaded whole,
# on all-MiniLM-L6-v2 (a safetensors folder). Carry .device/minilm (the model and the wheels the image lacks).
#   STOP_AFTER  seconds before the SIGINT (default 40)
# Prints each run's summary tail and the largest difference between the resumed and the whole-load checkpoints
# (on CUDA the fitting's sums add in the order the GPU picks, so they may differ in the last bits).
set -uo pipefail
OUT=${OUT:-/tmp/streaming-check}
mkdir -p "$OUT" /tmp/site
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .device/minilm/*.whl
rm -rf /tmp/minilm /tmp/stream-out /tmp/whole-out /tmp/.stream-out.resume && cp -r .device/minilm /tmp/minilm && rm -f /tmp/minilm/*.whl
rpq=(python3 -m model_compress.cli.app rpq /tmp/minilm --device cuda --finetune-steps "${STEPS:-40}")
run() { "${rpq[@]}" "$@"; }
start=$(date +%s)
timeout -s INT "${STOP_AFTER:-40}" "${rpq[@]}" -o /tmp/stream-out > "$OUT/stopped.log" 2>&1
echo "stopped run: exit $? after $(( $(date +%s) - start )) s; $(grep -c . "$OUT/stopped.log") lines"; tail -2 "$OUT/stopped.log"
ls /tmp/.stream-out.resume 2>/dev/null | head -20
start=$(date +%s)
run -o /tmp/stream-out --resume > "$OUT/resumed.log" 2>&1; echo "resumed run: exit $? in $(( $(date +%s) - start )) s"; tail -4 "$OUT/resumed.log"
start=$(date +%s)
run -o /tmp/whole-out --no-stream > "$OUT/whole.log" 2>&1; echo "whole-load run: exit $? in $(( $(date +%s) - start )) s"; tail -4 "$OUT/whole.log"
python3 - <<'PY' 2>&1 | tee "$OUT/compare.txt"
from safetensors.torch import load_file
import glob
a = {k: v for f in glob.glob("/tmp/stream-out/*.safetensors") for k, v in load_file(f).items()}
b = {k: v for f in glob.glob("/tmp/whole-out/*.safetensors") for k, v in load_file(f).items()}
same = sum(1 for k in a if k in b and a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))
print(f"tensors: {len(a)} resumed-streamed, {len(b)} whole-load; identical: {same}")
worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a if k in b and a[k].is_floating_point())
print("largest difference of a floating tensor:", worst)
PY
