"""Is eager `generate` of a compressed model slow because of the package's Python, or because of its launches? On a
CPU, with every kernel replaced by an empty output, what is left is the Python around the launches.

    python benchmarks/experiments/empty_launches.py SOURCE FOLDER [--tokens 48] [--repeats 3]

SOURCE: the original (a folder or anything `compress` takes); FOLDER: its `compress rpq` output. Each model runs
greedy ``generate`` in a child process on the CPU (float32, batch 1, a 32-token prompt) with its heavy work emptied:
for the original every ``nn.Linear``'s ``F.linear`` (the head's too) returns an uninitialised tensor of the right
shape, for the compressed model every kept launch plan of ``packed_forward`` does (linear, sibling group, norm and
SiLU prologues, rotation, tied head, embedding rows). Norms, rotary embeddings, attention and the cache still run
in both, as torch ops on small tensors. Prints milliseconds per token, best of ``--repeats``, for both, and their
ratio: near 1 says the package's Python costs what transformers' own layers cost, and a GPU's slower eager decode
comes from the launches themselves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
role, source, folder, tokens, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
if role == "original":
    from model_compress.core.sources import load_model, resolve_source
    model, _ = load_model(resolve_source(source), torch.float32)
    torch.nn.modules.linear.F.linear = lambda x, w, b=None: torch.empty(*x.shape[:-1], w.shape[0])
else:
    import model_compress
    from model_compress.rpq.kernels import packed_forward as paths
    empty = lambda shape: (lambda *args: torch.empty(shape))
    paths.linear_plan = lambda x, codes, *rest: empty((*x.shape[:-1], codes.shape[0]))
    paths.linear_group_plan = lambda x, members, *rest: (
        lambda x: tuple(torch.empty(*x.shape[:-1], member[0].shape[0]) for member in members))
    paths.norm_rotate_plan = lambda x, *rest: empty(x.shape)
    paths.gated_silu_rotate_plan = lambda gate, *rest: empty(gate.shape)
    paths.rotate_plan = lambda x, *rest, **named: empty(x.shape)
    paths.tied_head_plan = lambda x, codes, books, scales, bias, bits, vocab: (lambda x: torch.empty(*x.shape[:-1], vocab))
    model = model_compress.load(folder, device="cpu", dtype=torch.float32)
    width = model.config.hidden_size
    paths.embedding_rows_plan = lambda ids, *rest: (lambda ids: torch.empty(*ids.shape, width))  # plans are built on first use
model.eval()
prompt = torch.randint(10, 1000, (1, 32))
def generate(count):
    model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0)
with torch.inference_mode():
    generate(8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(tokens)
        times.append((time.perf_counter() - start) / tokens * 1e3)
print("RESULT " + json.dumps({"role": role, "ms_per_token": min(times)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("folder")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures = {}
    for role in ("original", "compressed"):
        done = subprocess.run([sys.executable, "-c", CHILD, role, args.source, args.folder, str(args.tokens), str(args.repeats)],
                              capture_output=True, text=True, check=True)
        line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
        figures[role] = json.loads(line[len("RESULT "):])["ms_per_token"]
    figures["ratio"] = figures["compressed"] / figures["original"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
