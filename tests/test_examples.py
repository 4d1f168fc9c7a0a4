"""Every script in examples/ runs as its docstring says, on a tiny model, and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ENGLISH

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two RPQ checkpoints of one tiny Llama, made by the first example."""
    from .conftest import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("examples")
    tiny_model("llama").save_pretrained(root / "llama")
    tiny_tokenizer("llama").save_pretrained(root / "llama")
    outputs = []
    for bits in (4, 6):
        out = root / f"rpq{bits}"
        printed = run_example("compress_and_load.py", root / "llama", out, "--bits", bits)
        assert "bits per weight" in printed and (out / "model.safetensors").is_file()
        assert printed.strip().splitlines()[-1].startswith("The river rose for three days")  # the generated line
        outputs.append(out)
    return root, outputs


def test_evaluate_two_checkpoints_side_by_side(checkpoints, tmp_path):
    _, (first, second) = checkpoints
    text = tmp_path / "text.txt"
    text.write_text(ENGLISH)
    printed = run_example("evaluate_checkpoints.py", first, second, "--text", text, "--seq-len", "32")
    assert printed.count("(perplexity):") == 2 and "perplexity" in printed and "x" in printed


def test_generate_through_transformers_from_pretrained(checkpoints):
    _, (first, _) = checkpoints
    printed = run_example("generate_with_transformers.py", first, "The river rose", "--new-tokens", "5")
    assert printed.startswith("The river rose")


def test_distil_on_own_text(checkpoints, tmp_path):
    root, _ = checkpoints
    text = tmp_path / "own.txt"
    text.write_text(ENGLISH * 4)
    printed = run_example("distil_on_own_text.py", root / "llama", text, tmp_path / "fff", "--depth", "2", "--steps", "5",
                          "--calib-tokens", "1024", "--seq-len", "64")
    assert printed.count("relative error") == 2 and (tmp_path / "fff" / "config.json").is_file()
