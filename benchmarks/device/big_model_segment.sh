#!/usr/bin/env bash
# One segment of a 7B-class streamed conversion on the GPU: Llama-2-7B's shapes (hidden 4096, 32 blocks, MLP 11008),
# random float16 weights written on the device as sharded safetensors with SmolLM2's tokenizer (hence its 49,152-row
# vocabulary), then `compress rpq --bits 4.5 --device cuda` (default calibration and fine-tuning) started, or resumed
# with --resume where an earlier segment on this machine stopped, and stopped with SIGINT after SEGMENT seconds (the
# device's calls are 10 minutes; a conversion is chained over several). Reports the segment's wall time, blocks done,
# the process's peak host memory (VmHWM) and the GPU's peak memory in use (nvidia-smi, every 0.5 s).
# Carry .device/plans (the wheels the image lacks and the tokenizer files). SEGMENT (default 300) and RPQ_ARGS pass on;
# BLOCKS (default 32) builds the same shapes with fewer blocks, for a whole conversion (fine-tuning included) in one call;
# EVAL=1 evaluates the result once the conversion is complete (the end of this file).
set -uo pipefail
OUT=${OUT:-/tmp/big-segment}
mkdir -p "$OUT" /tmp/site
export PYTHONPATH="$PWD:$PWD/benchmarks/rpq:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .device/plans/*.whl
NAME=llama7b${BLOCKS:+-b$BLOCKS}
MODEL=/tmp/$NAME
export BLOCKS=${BLOCKS:-32} MODEL
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  start=$(date +%s)
  python3 - <<'PY'
import os, pathlib, shutil, torch, transformers
config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=int(os.environ["BLOCKS"]), num_attention_heads=32,
                                  num_key_value_heads=32, vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(config).half()
model.save_pretrained(os.environ["MODEL"], max_shard_size="5GB")
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if pathlib.Path(f".device/plans/{name}").exists():
        shutil.copy(f".device/plans/{name}", os.environ["MODEL"])
print("parameters", sum(p.numel() for p in model.parameters()))
PY
  echo "7B-class checkpoint written in $(( $(date +%s) - start )) s: $(du -sh $MODEL | cut -f1)" | tee -a "$OUT/segment.txt"
fi
resume=()
[ -d "/tmp/.$NAME-out.resume" ] && resume=(--resume)
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_memory_mib.log" &
sampler=$!
python3 - "$MODEL" "${SEGMENT:-300}" "/tmp/$NAME-out" "${resume[@]}" ${RPQ_ARGS:-} <<'PY' 2>&1 | tee -a "$OUT/segment.txt"
import json, signal, subprocess, sys, threading, time
from timed_cli import CHILD
model, segment, out, extra = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
command = [sys.executable, "-c", CHILD, "rpq", model, "-o", out, "--bits", "4.5", "--device", "cuda", *extra]
print("+", " ".join(command[3:]))
start = time.perf_counter()
child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
lines = []
reader = threading.Thread(target=lambda: [lines.append(l) for l in child.stdout])
reader.start()
try:
    child.wait(timeout=segment)
except subprocess.TimeoutExpired:
    child.send_signal(signal.SIGINT)
    child.wait(timeout=120)
reader.join()
wall = time.perf_counter() - start
open("/tmp/segment_log.txt", "a").writelines(lines)
print("".join(l for l in lines if not l.startswith("BENCH"))[-4000:])
bench = next((json.loads(l[6:]) for l in lines if l.startswith("BENCH ")), {})
print(json.dumps({"segment_wall_s": wall, "exit_code": child.returncode, **bench}))
PY
kill $sampler 2>/dev/null
echo "GPU memory in use, peak: $(sort -n "$OUT/gpu_memory_mib.log" | tail -1) MiB" | tee -a "$OUT/segment.txt"
cp /tmp/segment_log.txt "$OUT/" 2>/dev/null
ls "/tmp/.$NAME-out.resume" 2>/dev/null | head -5
# EVAL=1: once the conversion is complete, `compress eval` of the result against the original on the GPU (speed and
# memory; random weights make its perplexity meaningless), EVAL_ARGS passed on
if [ "${EVAL:-0}" = 1 ] && [ -f "/tmp/$NAME-out/config.json" ]; then
  timeout "${EVAL_SECONDS:-400}" python3 -m model_compress.cli.app eval "/tmp/$NAME-out" --device cuda --force \
    --json "$OUT/eval_report.json" ${EVAL_ARGS:---max-tokens 8192} 2>&1 | tee "$OUT/eval.log" | tail -30
fi
