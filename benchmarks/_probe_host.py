import cProfile, pstats, sys, torch, time
sys.path.insert(0, ".")
import model_compress
comp = model_compress.load("/tmp/w/opt-1.3b-rpq32", device="cuda", dtype=torch.float16).eval()
for tokens in (512, 1):
    ids = torch.randint(10, 1000, (1, tokens), device="cuda")
    with torch.inference_mode():
        for _ in range(3): comp(input_ids=ids)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t = time.perf_counter(); prof.enable(); comp(input_ids=ids); torch.cuda.synchronize(); prof.disable()
        print(tokens, "tokens: wall ms", (time.perf_counter() - t) * 1e3)
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
