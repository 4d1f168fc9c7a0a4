#!/usr/bin/env bash
# Issue 5 on the lent GPU, in three calls made back to back (the machine keeps /tmp while it stays warm):
#   run(command="STAGE=kernels bash benchmarks/device/gpu_rpq.sh", carry=[".device/evalA"])  # Triton tests, kernel tuning (+ stores GGUF part a);
#                                                       # TUNE=0: report the routes in the code instead of tuning;
#                                                       # TUNE_BOUNDS=256,...: tune only those token buckets
#                                                       # OVERLAP=0: skip rpq_prefill_overlap.py
#   run(command="STAGE=smol bash benchmarks/device/gpu_rpq.sh", carry=[".device/evalB"])     # SmolLM2-135M (GGUF part b + wheels): rpq, eval, profile
#   run(command="STAGE=opt bash benchmarks/device/gpu_rpq.sh")                                # opt-1.3b architecture (SmolLM2's tokenizer): rpq, eval, profile
# The tuned routes of the first call (/tmp/rpq_routes.json) are what the later calls use.
# benchmarks/README.md says how the GGUF parts and wheels are made. Logs and JSON go to $OUT/$STAGE.tgz.
set -uo pipefail
# Everything a stage writes goes into one archive, $OUT/$STAGE.tgz: the device tool returns only a few files per call.
RETURN=${OUT:-/tmp/gpu-rpq}
OUT=$(mktemp -d)
trap 'tar czf "$RETURN/${STAGE:-none}.tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
mkdir -p "$RETURN" /tmp/smol
export PYTHONPATH="$PWD:$PWD/benchmarks:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
ROUTES=/tmp/rpq_routes.json
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$ROUTES" ] && export MODEL_COMPRESS_RPQ_ROUTES=$ROUTES

case "${STAGE:?set STAGE to kernels, opt or smol}" in
kernels)
  [ -f .device/evalA/smol.part-a ] && cp .device/evalA/smol.part-a /tmp/smol/
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
  if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0: a later tuning call of the same session
    echo "== Triton kernel tests (code routes), graph-decode and CUDA tests"
    timeout 450 python3 -m pytest -q -n 12 -p no:cacheprovider tests/rpq/test_triton_kernels.py tests/eval/test_graph_decode.py tests/rpq/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15
  fi
  echo "== tuning"
  if [ "${TUNE:-1}" = 0 ]; then  # the routes in the code, reported without tuning
    timeout 300 python3 benchmarks/rpq/rpq_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
  else
    # TUNE_BOUNDS (e.g. 256,4611686018427387904): tune only those buckets, the code's routes for the rest
    # REPORT=0: stop after tuning (the routes file feeds the next call, which reports)
    timeout 420 python3 benchmarks/rpq/rpq_kernels.py --tune ${TUNE_BOUNDS:+--tune-bounds "$TUNE_BOUNDS"} --save-routes "$ROUTES.new" \
      $([ "${REPORT:-1}" = 0 ] && echo --no-report) --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
    [ -f "$ROUTES.new" ] && mv "$ROUTES.new" "$ROUTES"
  fi
  cp "$ROUTES" "$OUT/" 2>/dev/null
  if [ "${OVERLAP:-1}" = 1 ]; then  # OVERLAP=0: skip the prompt-path experiments (rpq_prefill_overlap.py)
    echo "== prompt path: can the weight decode hide behind the GEMM?"
    timeout 240 python3 benchmarks/experiments/rpq_prefill_overlap.py --json "$OUT/prefill_overlap.json" 2>&1 | grep -v Warning | tee "$OUT/prefill_overlap.log"
  fi
  ;;
opt)
  [ -f "$ROUTES" ] && MODEL_COMPRESS_RPQ_ROUTES=$ROUTES timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/rpq/test_triton_kernels.py \
    -k "fused or routed or capturable or whole_model" 2>&1 | tee "$OUT/tests_tuned.log" | tail -4
  python3 benchmarks/rpq/rpq_decode.py opt-1.3b --name opt-1.3b --workdir /tmp/w --out "$OUT" --repeats 2 --profile \
    --tokenizer /tmp/w/smollm2-135m-rpq32 2>&1 | tee "$OUT/opt.log" | tail -60
  echo "== memory split"
  python3 benchmarks/rpq/rpq_memory.py /tmp/w/opt-1.3b-random /tmp/w/opt-1.3b-rpq32 --json "$OUT/memory_opt.json" 2>&1 | tee "$OUT/memory_opt.log" | tail -5
  echo "== memory split and graphed decode without code bins (MODEL_COMPRESS_RPQ_BINS=0)"
  MODEL_COMPRESS_RPQ_BINS=0 python3 benchmarks/rpq/rpq_memory.py /tmp/w/opt-1.3b-random /tmp/w/opt-1.3b-rpq32 --json "$OUT/memory_opt_nobins.json" 2>&1 | tee "$OUT/memory_opt_nobins.log" | tail -3
  echo "== the same with the pre-norms left as they are (MODEL_COMPRESS_FUSED_NORM=0): what the fused norm adds"
  MODEL_COMPRESS_FUSED_NORM=0 python3 benchmarks/rpq/rpq_memory.py /tmp/w/opt-1.3b-random /tmp/w/opt-1.3b-rpq32 --json "$OUT/memory_opt_nonorm.json" 2>&1 | tee "$OUT/memory_opt_nonorm.log" | tail -3
  ;;
smol)
  [ -f /tmp/smol/smol.part-a ] || { echo "error: /tmp/smol/smol.part-a is missing (machine given back); start again" >&2; exit 2; }
  cat /tmp/smol/smol.part-a .device/evalB/smol.part-b > "$GGUF"
  echo "$(cat .device/evalB/smol.sha256)  $GGUF" | sha256sum -c || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/evalB/*.whl || exit 1
  python3 benchmarks/rpq/rpq_decode.py "$GGUF" --name smollm2-135m --workdir /tmp/w --out "$OUT" --repeats 2 --profile 2>&1 | tee "$OUT/smol.log" | tail -60
  echo "== memory split"
  python3 benchmarks/rpq/rpq_memory.py "$GGUF" /tmp/w/smollm2-135m-rpq32 --json "$OUT/memory_smol.json" 2>&1 | tee "$OUT/memory_smol.log" | tail -5
  echo "== memory split and graphed decode without code bins (MODEL_COMPRESS_RPQ_BINS=0)"
  MODEL_COMPRESS_RPQ_BINS=0 python3 benchmarks/rpq/rpq_memory.py "$GGUF" /tmp/w/smollm2-135m-rpq32 --json "$OUT/memory_smol_nobins.json" 2>&1 | tee "$OUT/memory_smol_nobins.log" | tail -3
  echo "== the same with the pre-norms left as they are (MODEL_COMPRESS_FUSED_NORM=0): what the fused norm adds"
  MODEL_COMPRESS_FUSED_NORM=0 python3 benchmarks/rpq/rpq_memory.py "$GGUF" /tmp/w/smollm2-135m-rpq32 --json "$OUT/memory_smol_nonorm.json" 2>&1 | tee "$OUT/memory_smol_nonorm.log" | tail -3
  echo "== the same with the SiLU-gated MLPs left as they are (MODEL_COMPRESS_FUSED_ACT=0): what forming silu(gate)*up in down_proj adds"
  MODEL_COMPRESS_FUSED_ACT=0 python3 benchmarks/rpq/rpq_memory.py "$GGUF" /tmp/w/smollm2-135m-rpq32 --json "$OUT/memory_smol_noact.json" 2>&1 | tee "$OUT/memory_smol_noact.log" | tail -3
  ;;
esac
