#!/usr/bin/env bash
# Issue 3 on the lent GPU: SmolLM2-135M original vs `compress rpq` at several --codebooks, through
# `compress eval` on the full default text, plus the CUDA and eval tests. Logs and JSON go to $OUT.
#
# The model's GGUF (98 MB) is over the device tool's 64 MiB per-call limit, so it travels in two parts
# over two calls made back to back (the machine keeps /tmp while it stays warm between them):
#   run(command="bash benchmarks/device/gpu_eval.sh", carry=[".device/evalA"])   # stores part a in /tmp/smol
#   run(command="bash benchmarks/device/gpu_eval.sh", carry=[".device/evalB"])   # part b, wheels, then measures
# benchmarks/README.md says how the parts and wheels (gguf, exllamav2 for the default text) are made.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-eval}
mkdir -p "$OUT" /tmp/smol
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf

if [ ! -f .device/evalB/smol.part-b ]; then  # the first call (an earlier call's folders stay on the machine)
  cp .device/evalA/smol.part-a /tmp/smol/ && echo "part a stored in /tmp/smol; now the call with .device/evalB"
  exit 0
fi
if [ ! -f /tmp/smol/smol.part-a ]; then
  echo "error: /tmp/smol/smol.part-a is missing (the machine was given back between the two calls); start again" >&2
  exit 2
fi
cat /tmp/smol/smol.part-a .device/evalB/smol.part-b > "$GGUF"
echo "$(cat .device/evalB/smol.sha256)  $GGUF" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/evalB/*.whl || exit 1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

echo "== tests (CUDA and eval)"
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -p no:cacheprovider tests/rpq/test_cuda.py tests/eval/test_eval.py 2>&1 | tee "$OUT/tests.log" | tail -5

echo "== SmolLM2-135M: original vs rpq at several --codebooks, full default text"
python3 benchmarks/eval/eval_curve.py "$GGUF" --codebooks ${CODEBOOKS:-32 96 288} --device cuda --workdir /tmp/curve --out "$OUT" \
  --repeats 3 --rpq-args "${RPQ_ARGS:---dtype float16}" 2>&1 | tee "$OUT/curve.log" | tail -25
