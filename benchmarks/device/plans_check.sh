#!/usr/bin/env bash
# One GPU call without the GGUF: the launch-plan and state-placement CUDA tests, host time per eager call
# (host_overhead.py), then the product end to end on a random-weight model of SmolLM2-135M's architecture (speed only:
# its perplexity means nothing): `compress rpq --device cuda` and `compress eval --device cuda` against it.
# Carry .device/plans: the wheels the image lacks (as in .device/evalA) and SmolLM2's tokenizer files, made with
#   mkdir -p .device/plans && cp .device/evalA/*.whl .device/plans/ && cp OUT/tokenizer.json OUT/tokenizer_config.json .device/plans/
# (OUT: any `compress rpq` output of the default model). TESTS=0 skips the tests, HEAD_INDEX=0 the head index's
# speed (benchmarks/rpq/head_index_speed.py), PRODUCT=0 the product run,
# HOST_OVERHEAD=0 host_overhead.py, HEAD_500K=0 the synthetic 500k-row head (head_index_500k.py), EVAL=0 the product's eval, HEAD_GRAPHED=0 the graphed decode with a head index (head_index_graphed.py), HOST_PROFILE=0 the cProfile of eager generate (host_profile.py), PREFILL_PROFILE=0 the prefill's kernels and launches (prefill_profile.py), ONLY_TESTS a list of tests run instead of the usual ones, HEAD_500K_ARGS passes on to head_index_500k.py, PLANS_OFF=0 its second eval with every call routed afresh (MODEL_COMPRESS_LAUNCH_PLANS=0), PDL_ON=1 a third with programmatic dependent launch (MODEL_COMPRESS_PROGRAMMATIC_LAUNCH=1); RPQ_ARGS and
# EVAL_ARGS pass on.
set -uo pipefail
OUT=${OUT:-/tmp/plans-check}
source benchmarks/device/plans_setup.sh
if [ -n "${ONLY_TESTS:-}" ]; then  # these tests instead of the list below
  timeout "${TEST_SECONDS:-240}" python3 -m pytest -q --tb=short -rfE -p no:cacheprovider $ONLY_TESTS > "$OUT/gpu_tests.log" 2>&1
  tail -8 "$OUT/gpu_tests.log"
elif [ "${TESTS:-1}" = 1 ]; then
  timeout "${TEST_SECONDS:-240}" python3 -m pytest -q --tb=short -rfE -p no:cacheprovider -n 4 tests/rpq/test_launch_plans.py \
    tests/rpq/test_packed_groups.py tests/rpq/test_state_placement.py \
    "tests/rpq/test_packed_kernels.py::test_a_direct_launch_skips_the_jit_after_its_first_call_and_computes_the_same" \
    "tests/rpq/test_packed_kernels.py::test_kept_plans_decode_the_same_logits_call_after_call_and_in_a_cuda_graph" \
    "tests/rpq/test_cuda.py::test_calibration_states_kept_in_host_memory_fit_as_well_as_states_kept_on_the_gpu" \
    "tests/rpq/test_cuda.py::test_a_streamed_conversion_keeps_its_converted_blocks_on_the_gpu_and_writes_them_from_there" \
    "tests/rpq/test_cuda.py::test_data_aware_budget_fit_on_cuda_matches_the_cpu_in_quality" \
    "tests/rpq/test_cuda.py::test_head_index_scores_on_cuda_equal_the_torch_reference_and_certify_the_dense_argmax" \
    ${MORE_TESTS:-} > "$OUT/gpu_tests.log" 2>&1; tail -8 "$OUT/gpu_tests.log"
fi
[ "${HOST_OVERHEAD:-1}" = 1 ] && python3 benchmarks/rpq/host_overhead.py --json "$OUT/host_overhead.json" 2>&1 | tee "$OUT/host_overhead.log"
[ "${HEAD_INDEX:-1}" = 1 ] && timeout 120 python3 benchmarks/rpq/head_index_speed.py --json "$OUT/head_index_speed.json" 2>&1 | tee "$OUT/head_index_speed.log"
if [ "${PRODUCT:-1}" != 1 ]; then
  [ "${HEAD_500K:-1}" = 1 ] && timeout 200 python3 benchmarks/rpq/head_index_500k.py --json "$OUT/head_index_500k.json" ${HEAD_500K_ARGS:-} 2>&1 | tee "$OUT/head_index_500k.log"
  exit 0
fi
python3 benchmarks/device/random_smollm2.py /tmp/rand-smol
python3 benchmarks/rpq/timed_cli.py rpq /tmp/rand-smol -o /tmp/rand-out --device cuda --force --finetune-steps 0 ${RPQ_ARGS:-} 2>&1 | tee "$OUT/rand_rpq.log" | tail -12
[ "${EVAL:-1}" = 1 ] && python3 -m model_compress.cli.app eval /tmp/rand-out --device cuda --force --max-tokens 8192 ${EVAL_ARGS:-} 2>&1 | tee "$OUT/rand_eval.log" | tail -25
cp /tmp/rand-out/eval_report.json "$OUT/rand_eval.json" 2>/dev/null; cp /tmp/rand-out/compression_report.json "$OUT/rand_report.json" 2>/dev/null
# where eager generate's host time goes, original vs compressed (benchmarks/rpq/host_profile.py)
if [ "${HOST_PROFILE:-1}" = 1 ]; then
  timeout 120 python3 benchmarks/rpq/host_profile.py /tmp/rand-out --source /tmp/rand-smol --tokens 48 --top 40 --out "$OUT" \
    > "$OUT/host_profile.log" 2>&1; grep "^==" "$OUT/host_profile.log"
fi
# where an eager prefill's time goes, original vs compressed, prompt kernel on and off (benchmarks/rpq/prefill_profile.py)
if [ "${PREFILL_PROFILE:-1}" = 1 ]; then
  timeout 200 python3 benchmarks/rpq/prefill_profile.py /tmp/rand-out --source /tmp/rand-smol --json "$OUT/prefill_profile.json" \
    > "$OUT/prefill_profile.log" 2>&1; grep "^==" "$OUT/prefill_profile.log"
fi
# whole-model graphed decode with the head answering from an index built here, against the model's own head
if [ "${HEAD_GRAPHED:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/rpq/head_index_graphed.py /tmp/rand-out --json "$OUT/head_index_graphed.json" 2>&1 | tail -4
fi
# the same compressed folder with every call routed afresh (MODEL_COMPRESS_LAUNCH_PLANS=0): what the kept plans save
if [ "${PLANS_OFF:-1}" = 1 ]; then
  MODEL_COMPRESS_LAUNCH_PLANS=0 python3 -m model_compress.cli.app eval /tmp/rand-out --device cuda --no-baseline --force \
    --json /tmp/rand-out/eval_plans_off.json --max-tokens 2048 ${EVAL_ARGS:-} 2>&1 | tee "$OUT/rand_eval_plans_off.log" | tail -14
  cp /tmp/rand-out/eval_plans_off.json "$OUT/rand_eval_plans_off.json" 2>/dev/null
fi
# the same compressed folder with programmatic dependent launch (MODEL_COMPRESS_PROGRAMMATIC_LAUNCH=1, off by default):
# what it saves (PDL_ON=1)
if [ "${PDL_ON:-0}" = 1 ]; then
  MODEL_COMPRESS_PROGRAMMATIC_LAUNCH=1 python3 -m model_compress.cli.app eval /tmp/rand-out --device cuda --no-baseline --force \
    --json /tmp/rand-out/eval_pdl_on.json --max-tokens 2048 ${EVAL_ARGS:-} 2>&1 | tee "$OUT/rand_eval_pdl_on.log" | tail -14
  cp /tmp/rand-out/eval_pdl_on.json "$OUT/rand_eval_pdl_on.json" 2>/dev/null
fi
# the synthetic 500k-row head (last: the product's figures come first)
[ "${HEAD_500K:-1}" = 1 ] && timeout 200 python3 benchmarks/rpq/head_index_500k.py --json "$OUT/head_index_500k.json" ${HEAD_500K_ARGS:-} 2>&1 | tee "$OUT/head_index_500k.log"
