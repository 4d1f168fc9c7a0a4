#!/usr/bin/env bash
# FFF on a GPU machine, in three calls made back to back (the machine keeps /tmp while it stays warm):
#   run(command="STAGE=block bash benchmarks/device/gpu_fff.sh", carry=[".device/evalA"])   # checks, block benchmarks; stores part a
#     (or STAGE=part-a: only store part a)
#   run(command="STAGE=smol bash benchmarks/device/gpu_fff.sh", carry=[".device/evalB"])    # SmolLM2-135M: fff-distill + eval at DEPTHS
#     (or SMOL_VARIANTS="args|args|...": one `compress fff-distill` argument string per checkpoint)
#   run(command="STAGE=minilm bash benchmarks/device/gpu_fff.sh", carry=[".device/minilm"]) # all-MiniLM-L6-v2: fff-distill + eval at DEPTHS
#     (or VARIANTS_FILE=F: one line of `compress fff-distill` arguments per checkpoint)
# benchmarks/README.md says how the carried folders are made. Logs and JSON go to $OUT. EVAL_ARGS replaces the
# `compress eval` options (default: MAX_TOKENS tokens, one-sequence decode of 64 new tokens).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-fff}
mkdir -p "$OUT" /tmp/smol
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
EVAL_ARGS=${EVAL_ARGS:-"--max-tokens ${MAX_TOKENS:-65536} --decode-batch 1 --new-tokens 64"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/device.txt"

# Carried folders stay on the machine between calls, so STAGE (not what was carried) picks the stage.
if [ "${STAGE:-}" = part-a ]; then  # only store SmolLM2's part a, for a smol call right after
  cp .device/evalA/smol.part-a /tmp/smol/ && echo "stored part a" && exit 0
fi
if [ "${STAGE:-}" = smol ]; then
  cat /tmp/smol/smol.part-a .device/evalB/smol.part-b > "$GGUF"
  echo "$(cat .device/evalB/smol.sha256)  $GGUF" | sha256sum -c || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/evalB/*.whl || exit 1
  if [ -n "${SMOL_VARIANTS:-}" ]; then IFS='|' read -ra CHOICE <<< "$SMOL_VARIANTS"; CHOICE=(--variants "${CHOICE[@]}")
  else CHOICE=(--depths ${DEPTHS:-2 4 6}); fi
  echo "== SmolLM2-135M: fff-distill, ${CHOICE[*]}"
  python3 benchmarks/fff/fff_curve.py "$GGUF" "${CHOICE[@]}" --device cuda --workdir /tmp/fff-smol --out "$OUT/smol" \
    --repeats 3 --fff-args "${FFF_ARGS:-}" --eval-args "$EVAL_ARGS" 2>&1 | tee "$OUT/smol.log" | tail -14
  exit 0
fi
if [ "${STAGE:-}" = minilm ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/minilm/*.whl || exit 1
  if [ -n "${VARIANTS_FILE:-}" ]; then mapfile -t CHOICE < "$VARIANTS_FILE"; CHOICE=(--variants "${CHOICE[@]}")
  else CHOICE=(--depths ${DEPTHS:-2 3 4 5 6}); fi
  echo "== all-MiniLM-L6-v2 (float16 copy): fff-distill, ${CHOICE[*]}"
  python3 benchmarks/fff/fff_curve.py .device/minilm "${CHOICE[@]}" --device cuda --workdir /tmp/fff-minilm \
    --out "$OUT/minilm" --repeats 3 --fff-args "${FFF_ARGS:-}" --eval-args "${EVAL_ARGS/ --decode-batch 1 --new-tokens 64/}" 2>&1 \
    | tee "$OUT/minilm.log" | tail -14
  exit 0
fi
if [ "${STAGE:-}" = block ]; then
  cp .device/evalA/smol.part-a /tmp/smol/
  echo "== FFF kernel and tree tests, then the block benchmark (checks the kernels on CUDA first)"
  python3 -m pytest -q -p no:cacheprovider tests/fff/test_tree_kernels.py tests/fff/test_top_leaves.py tests/fff/test_fff.py 2>&1 | tail -15
  python3 benchmarks/fff/fff_block.py --device cuda 2>&1 | tee "$OUT/fff_block.md"
  python3 benchmarks/fff/decode_crossover.py --device cuda 2>&1 | tee "$OUT/decode_crossover.md"
  python3 benchmarks/fff/grouped_rate.py --device cuda --sweep 2>&1 | tee "$OUT/grouped_rate.md"
  exit 0
fi
echo "error: set STAGE to block, smol or minilm" >&2
exit 2
