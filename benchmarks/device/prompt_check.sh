#!/usr/bin/env bash
# One GPU call for the prompt route: the prompt kernel's CUDA tests (and any in MORE_TESTS), the prompt tiles against
# decode + cuBLAS on one layer (packed_kernels.py --prompt-sweep), then the 7B-class model (rpq_7b_speed.py:
# prefill with the prompt kernel and with decode + cuBLAS, graphed decode). Carry .device/plans (the wheels the image
# lacks; plans_check.sh's header says how it is made). TESTS=0 / SWEEP=0 / SEVEN_B=0 skip a step, ASM=1
# adds benchmarks/experiments/prompt_kernel_asm.py, BF16=1 the bf16 byte-permute tests and benchmarks/rpq/nibble_bf16.py; SWEEP_ARGS, SEVEN_B_ARGS pass on.
set -uo pipefail
OUT=${OUT:-/tmp/prompt-check}
source benchmarks/device/plans_setup.sh
[ "${TESTS:-1}" = 1 ] && timeout "${TEST_SECONDS:-150}" python3 -m pytest -q --tb=short -rfE -p no:cacheprovider -n 4 \
  "tests/rpq/test_packed_kernels.py::test_the_prompt_kernel_matches_the_reference_on_every_tile_and_against_the_decode_route" \
  "tests/rpq/test_packed_kernels.py::test_nibble_kernels_match_reference_on_every_tile" \
  "tests/rpq/test_packed_kernels.py::test_rpq_modules_on_packed_kernels_match_their_dense_weights" \
  ${MORE_TESTS:-} > "$OUT/gpu_tests.log" 2>&1 && tail -6 "$OUT/gpu_tests.log"
[ "${ASM:-0}" = 1 ] && timeout 120 python3 benchmarks/experiments/prompt_kernel_asm.py --json "$OUT/prompt_kernel_asm.json" 2>&1 | tail -16
if [ "${BF16:-0}" = 1 ]; then  # bf16 tokens on the byte-permute kernels: their tests, then their time against the general kernels
  timeout 150 python3 -m pytest -q --tb=short -rfE -p no:cacheprovider -n 4 tests/rpq/test_packed_kernels.py -k "bf16 and (nibble or group)" \
    > "$OUT/gpu_tests_bf16.log" 2>&1; tail -4 "$OUT/gpu_tests_bf16.log"
  timeout 90 python3 benchmarks/rpq/nibble_bf16.py --json "$OUT/nibble_bf16.json" 2>&1 | tee "$OUT/nibble_bf16.log"
fi
if [ "${SWEEP:-1}" = 1 ]; then
  timeout "${SWEEP_SECONDS:-200}" python3 benchmarks/rpq/packed_kernels.py --prompt-sweep --json "$OUT/prompt_sweep.json" ${SWEEP_ARGS:-} \
    > "$OUT/prompt_sweep.log" 2>&1; grep -v "^  prompts" "$OUT/prompt_sweep.log" | tail -12
fi
if [ "${SEVEN_B:-1}" = 1 ]; then
  timeout "${SEVEN_B_SECONDS:-240}" python3 benchmarks/rpq/rpq_7b_speed.py --json "$OUT/rpq_7b_speed.json" ${SEVEN_B_ARGS:-} \
    > "$OUT/rpq_7b_speed.log" 2>&1; grep "^{" "$OUT/rpq_7b_speed.log" | cut -c1-700
fi
exit 0
