"""Write a model of SmolLM2-135M's architecture with random bf16 weights (speed only: its perplexity means nothing),
with SmolLM2's tokenizer files from the carried folder, for the device scripts' product runs.

    python3 benchmarks/device/random_smollm2.py OUT_DIR [TOKENIZER_DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import transformers


def main() -> None:
    out = Path(sys.argv[1])
    tokenizer = Path(sys.argv[2] if len(sys.argv) > 2 else ".device/plans")
    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out)
    print(f"random SmolLM2-shaped model written to {out}")


if __name__ == "__main__":
    main()
