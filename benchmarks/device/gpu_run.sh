#!/usr/bin/env bash
# Everything the lent GPU is needed for, in one call (device time is scarce):
#   versions -> CUDA correctness tests -> opt-1.3b `compress rpq` end to end -> torch forward dispatch on the GPU.
# Run from the repository root on the device machine:  bash benchmarks/device/gpu_run.sh
# Logs go to $OUT (the device tool brings them back). Needs transformers >= 5: when the image has
# an older one, wheels carried in .device/wheels (see benchmarks/README.md) are installed first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-run}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
if ! python3 -c "import sys, transformers; sys.exit(tuple(map(int, transformers.__version__.split('.')[:2])) < (5, 24))"; then
  echo "installing carried wheels (image transformers is older than 5.24)" | tee -a "$OUT/device.txt"
  python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target /tmp/site .device/wheels/*.whl 2>&1 | tail -3 | tee -a "$OUT/device.txt"
fi
python3 - <<'PY' 2>&1 | tee -a "$OUT/device.txt"
import platform, torch, transformers, safetensors, typer, rich
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "safetensors", safetensors.__version__, "typer", typer.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PY

STAGES=${STAGES:-tests opt dispatch}  # a subset for a shorter call: STAGES=tests
if [[ " $STAGES " == *" tests "* ]]; then
  echo "== CUDA tests" | tee "$OUT/tests.log"
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
  timeout "${TEST_SECONDS:-480}" python3 -m pytest -q -rfE -p no:cacheprovider $XDIST ${TESTS:-tests/rpq/test_cuda.py tests/rpq/test_triton_kernels.py \
    tests/rpq/test_layers.py tests/eval/test_graph_decode.py tests/rpq/test_fused_glu.py tests/rpq/test_fused_norm.py tests/rpq/test_fit.py tests/rpq/test_kmeans.py} \
    2>&1 | tee -a "$OUT/tests.log" | tail -12
fi
if [[ " $STAGES " == *" opt "* ]]; then
  echo "== opt-1.3b end to end"
  python3 benchmarks/rpq/rpq_opt13b.py --workdir /tmp/opt13b --repeats 2 2>&1 | tee "$OUT/opt13b.log" | tail -8
fi
if [[ " $STAGES " == *" dispatch "* ]]; then
  echo "== torch forward dispatch, GPU"
  python3 benchmarks/rpq/forward_dispatch.py --device cuda --dtype float16 2>&1 | tee "$OUT/dispatch.log" | tail -28
fi
