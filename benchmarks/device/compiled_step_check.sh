#!/usr/bin/env bash
# One GPU call: where the compiled decode step's time goes, on a random-weight model of SmolLM2-135M's architecture put
# through the product (`compress rpq --device cuda`), under each setting in VARIANTS (benchmarks/rpq/compiled_step_profile.py,
# one process per setting: the options come from the environment), then CUDA tests in the time left (ONLY_TESTS, for
# TEST_SECONDS). Carry .device/plans (plans_check.sh says how it is made).
#   VARIANTS: ';'-separated "label|ENV=VALUE ENV=VALUE|batches|more arguments" (--mode graphed, --host-profile PREFIX);
#   the first also times the original.
set -uo pipefail
OUT=${OUT:-/tmp/step-check}
source benchmarks/device/plans_setup.sh
VARIANTS=${VARIANTS:-"default||1 16;rotation launched apart|MODEL_COMPRESS_ROTATE_IN_LOAD=0|1 16;programmatic launch|MODEL_COMPRESS_PROGRAMMATIC_LAUNCH=1|1"}
python3 benchmarks/device/random_smollm2.py /tmp/rand-smol
python3 benchmarks/rpq/timed_cli.py rpq /tmp/rand-smol -o /tmp/rand-out --device cuda --force --finetune-steps 0 ${RPQ_ARGS:-} 2>&1 | tee "$OUT/rand_rpq.log" | tail -6
first=1; index=0
IFS=';' read -ra settings <<< "$VARIANTS"
for setting in "${settings[@]}"; do
  IFS='|' read -r label environment batches more <<< "$setting"
  env $environment timeout "${PROFILE_SECONDS:-200}" python3 benchmarks/rpq/compiled_step_profile.py /tmp/rand-out --source /tmp/rand-smol \
    --batch $batches --label "$label" --original $first --json "$OUT/step_profile_$index.json" ${more:-} 2>&1 | tee "$OUT/step_profile_$index.log" | grep -v "Warning"
  first=0; index=$((index + 1))
done
if [ -n "${ONLY_TESTS:-}" ]; then
  timeout "${TEST_SECONDS:-150}" python3 -m pytest -q --tb=short -rfE -p no:cacheprovider $ONLY_TESTS > "$OUT/gpu_tests.log" 2>&1
  tail -15 "$OUT/gpu_tests.log"
fi
