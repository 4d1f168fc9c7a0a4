import sys, time, torch, statistics
sys.path.insert(0, ".")
import model_compress
from model_compress.quantize import triton_dispatch
from model_compress.models import load_model, resolve_source

def timed(model, ids, n=5):
    with torch.inference_mode():
        for _ in range(2): model(input_ids=ids)
        torch.cuda.synchronize()
        ev = []
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter(); s.record(); model(input_ids=ids); e.record(); e.synchronize()
            ev.append((s.elapsed_time(e), (time.perf_counter() - t) * 1e3))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids); torch.cuda.synchronize()
        kern = sum(e.device_time_total for e in prof.key_averages()) / 1e3
        top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]
    return statistics.median(a for a, _ in ev), statistics.median(b for _, b in ev), kern, [(e.key[:50], round(e.device_time_total/1e3, 2), e.count) for e in top]

import subprocess
from pathlib import Path
sys.path.insert(0, "benchmarks")
from rpq_decode import build, OPT_1_3B
src = "/tmp/w/opt-1.3b-random"
if not Path(src, "config.json").exists():
    build(Path(src), "cuda", OPT_1_3B)
if not Path("/tmp/w/opt-1.3b-rpq32").exists():
    subprocess.run([sys.executable, "-m", "model_compress.cli", "rpq", src, "-o", "/tmp/w/opt-1.3b-rpq32", "--codebooks", "32", "--device", "cuda", "--dtype", "float16"], check=True, capture_output=True)
ids = torch.randint(10, 1000, (1, 512), device="cuda")
comp = model_compress.load("/tmp/w/opt-1.3b-rpq32", device="cuda", dtype=torch.float16).eval()
for chunk in (32 << 20, 8 << 20):
    triton_dispatch.DECODE_CHUNK_BYTES = chunk
    print("compressed chunk", chunk >> 20, "MiB: event ms, wall ms, kernel ms", timed(comp, ids))
del comp; torch.cuda.empty_cache()
orig = load_model(resolve_source("/tmp/w/opt-1.3b-random"), torch.float16)[0].to("cuda", torch.float16).eval()
print("original: event ms, wall ms, kernel ms", timed(orig, ids))
