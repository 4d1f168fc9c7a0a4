"""Peak host memory of `compress rpq` on a safetensors checkpoint, streamed (the default) against `--no-stream`
(loaded whole first), for random Llama checkpoints of several depths: does it grow with the number of blocks?

    python benchmarks/rpq/streamed_memory.py [--layers 6 24] [--hidden 1024] [--json FILE] [CLI ARGS after --]

Each checkpoint is a random LlamaForCausalLM (hidden H, FF 3H, float32, sharded at 100 MB) with a tokenizer
trained here; each conversion runs in a child process (``timed_cli``), peak RSS from ``getrusage``. The default
CLI arguments fit fixed small tables on little calibration (memory, not quality or speed, is measured):
--codebooks 64 --codebook-size 16 --rounds 1 --calib-tokens 512 --calib-seq-len 64.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import ENGLISH, tiny_tokenizer  # noqa: E402  (the tokenizer the tests train: no hub)
from timed_cli import run_timed_cli  # noqa: E402

DEFAULT_ARGS = ["--codebooks", "64", "--codebook-size", "16", "--rounds", "1", "--calib-tokens", "512", "--calib-seq-len", "64"]


def checkpoint(folder: Path, layers: int, hidden: int) -> int:
    """A random Llama of ``layers`` blocks saved in shards; returns its bytes on disk."""
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="100MB")
    tiny_tokenizer("llama").save_pretrained(folder)
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("cli_args", nargs="*", help="arguments for compress rpq (after --)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        text = work / "text.txt"
        text.write_text(ENGLISH * 8)
        for layers in args.layers:
            source = work / f"llama-{layers}"
            stored = checkpoint(source, layers, args.hidden)
            for stream in ("--stream", "--no-stream"):
                out = work / f"out-{layers}{stream}"
                figures = run_timed_cli("rpq", str(source), "-o", str(out), "--calib", str(text), stream,
                                        *(args.cli_args or DEFAULT_ARGS))
                rows.append({"layers": layers, "checkpoint_mb": stored / 1e6, "mode": stream, **figures})
                print(f"{layers:3d} blocks, checkpoint {stored / 1e6:7.1f} MB  {stream:12s} peak RSS {figures['peak_rss_mb']:7.1f} MB"
                      f"  {figures['wall_s']:6.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
