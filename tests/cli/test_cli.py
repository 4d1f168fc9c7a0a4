"""The CLI through Typer's test runner: a working run, and every bad input as one line with exit 1."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from torch import nn

from ..conftest import assert_one_line_error, run_cli

QUICK = ("--calib-tokens", "1024")  # a few windows of the packaged calibration mix keep tiny conversions fast


def test_rpq_on_a_local_folder_writes_a_checkpoint_and_a_table(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run_cli("rpq", str(tiny_folder("opt")), "-o", str(out), "--codebooks", "8", "--codebook-size", "16", "--device", "cpu", *QUICK)
    assert result.exit_code == 0, result.output
    assert "RPQ conversion" in result.stdout and "bpw = codes + codebooks" in result.stdout
    assert "fc1" in result.stdout and "bits per weight" in result.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["num_codebooks"] == 8

    inspected = run_cli("inspect", str(out))
    assert inspected.exit_code == 0, inspected.output
    assert "RPQ M=8 K=16" in inspected.stdout and "fc1" in inspected.stdout


def test_rpq_reports_the_divisor_it_chose(tiny_folder, tmp_path):
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(tmp_path / "o"), "-m", "13", "-k", "16", "--device", "cpu", *QUICK)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "q_proj" in line)
    assert "D=4 K=16" in row  # 13 does not divide 64; the nearest divisor, 16 codebooks of D = 4 rows, was used


def test_dtype_option_sets_the_stored_dtype(tiny_folder, tmp_path):
    import model_compress

    out = tmp_path / "bf16"
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(out), "-m", "8", "-k", "16", "--dtype", "bfloat16", "--device", "cpu", *QUICK)
    assert result.exit_code == 0, result.output
    model = model_compress.load(out)
    down = model.model.layers[0].mlp.down_proj
    assert down.codebooks.dtype == torch.bfloat16 and down.indices.dtype == torch.uint8
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 5))).logits.float()).all()


def test_unknown_path(tmp_path):
    assert_one_line_error(run_cli("rpq", str(tmp_path / "nope"), "-o", str(tmp_path / "o")), "does not exist")


def test_hub_id_offline(tmp_path, monkeypatch):
    from model_compress.core import sources as models

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("rpq", "someone/some-model", "-o", str(tmp_path / "o"))
    assert_one_line_error(result, "someone/some-model", "cannot be reached")
    assert not (tmp_path / "o").exists()


def test_folder_that_is_no_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    assert_one_line_error(run_cli("rpq", str(tmp_path / "notes"), "-o", str(tmp_path / "o")), "holds no model")


def test_a_file_that_is_no_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"xx")
    assert_one_line_error(run_cli("rpq", str(tmp_path / "weights.bin"), "-o", str(tmp_path / "o")), "not a .gguf")


@pytest.mark.parametrize("value,fragment", [("0", "positive"), ("-3", "positive"), ("100000", "larger than the dimension")])
def test_bad_codebooks(tiny_folder, tmp_path, value, fragment):
    result = run_cli("rpq", str(tiny_folder("gpt2")), "-o", str(tmp_path / "o"), "--codebooks", value, "--device", "cpu")
    assert_one_line_error(result, "--codebooks", fragment)
    assert not (tmp_path / "o").exists()


def test_bad_settings_fail_before_the_model_loads(tmp_path, monkeypatch):
    from model_compress.rpq import pipeline

    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: pytest.fail("loaded before checking the settings"))
    out = ("-o", str(tmp_path / "o"))
    assert_one_line_error(run_cli("rpq", *out, "--codebooks", "0"), "--codebooks", "positive")
    assert_one_line_error(run_cli("rpq", *out, "--rounds", "0"), "--rounds", "positive")
    assert_one_line_error(run_cli("rpq", *out, "-k", "1"), "--codebook-size")
    assert_one_line_error(run_cli("rpq", *out, "--bits", "1"), "--bits must be above 1")
    assert_one_line_error(run_cli("rpq", *out, "--bits", "0.5"), "--bits must be above 1")
    assert_one_line_error(run_cli("rpq", *out, "--bits", "17"), "at most 16")
    assert_one_line_error(run_cli("rpq", *out, "--bits", "4", "--codebooks", "32"), "--bits", "not both")
    assert_one_line_error(run_cli("rpq", *out, "--codebook-bits", "12"), "--codebook-bits must be 8 or 16")
    assert_one_line_error(run_cli("rpq", *out, "--calib-tokens", "0"), "--calib-tokens", "positive")
    assert_one_line_error(run_cli("rpq", *out, "--finetune-steps", "-1"), "--finetune-steps")
    assert_one_line_error(run_cli("rpq", *out, "--finetune-checkpointing", "always"), "--finetune-checkpointing", "auto, on, off")
    assert_one_line_error(run_cli("rpq", *out, "--max-gpu-memory", "24"), "--max-gpu-memory '24'", "24GB or 20GiB")
    assert_one_line_error(run_cli("rpq", *out, "--max-gpu-memory", "24GB", "--device", "cpu"), "--max-gpu-memory", "on cpu")
    assert_one_line_error(run_cli("rpq", *out, "--calib", str(tmp_path / "missing.txt")), "--calib", "does not exist")
    (tmp_path / "empty.txt").write_text("  \n")
    assert_one_line_error(run_cli("rpq", *out, "--calib", str(tmp_path / "empty.txt")), "--calib", "is empty")
    assert_one_line_error(run_cli("rpq", *out, "--calib", "none", "--finetune-steps", "5"), "--finetune-steps needs calibration")
    assert not (tmp_path / "o").exists()


def test_calibration_text_shorter_than_a_window(tiny_folder, tmp_path):
    (tmp_path / "short.txt").write_text("Only a few words of text.")
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(tmp_path / "o"), "--calib", str(tmp_path / "short.txt"), "--device", "cpu")
    assert_one_line_error(result, "the calibration text 'short.txt' has", "tokens; one window needs 2,048")
    assert not (tmp_path / "o").exists()


def test_default_budget_run_allocates_formats_and_reports_them(tiny_folder, tmp_path):
    out = tmp_path / "o"
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(out), "--bits", "4", "--device", "cpu", *QUICK)
    assert result.exit_code == 0, result.output
    assert "budget 4" in result.stdout and "calibration: " in result.stdout and "output err" in result.stdout
    report = json.loads((out / "compression_report.json").read_text())
    assert report["summary"]["bits_per_weight"] <= 4.0
    assert report["summary"]["calibration"]["fit_tokens"] >= 1024 - 2048  # one window at least
    chosen = report["allocation"]["layers"]["model.layers.0.mlp.down_proj"]
    assert chosen["chosen"] in [{k: c[k] for k in ("num_codebooks", "codebook_size", "codebook_dtype")} for c in chosen["candidates"]]
    layer = next(r for r in report["summary"]["layers"] if r["name"] == "model.layers.0.mlp.down_proj")
    assert layer["output_error"] is not None and layer["weight_error"] > 0 and layer["bits_per_weight"] > 0


def test_cuda_without_cuda(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_cli("rpq", str(tiny_folder("gpt2")), "-o", str(tmp_path / "o"), "--device", "cuda")
    assert_one_line_error(result, "CUDA is not available")


def test_bad_dtype_and_device_names(tmp_path):
    assert_one_line_error(run_cli("rpq", "-o", str(tmp_path / "o"), "--dtype", "float8"), "--dtype")
    assert_one_line_error(run_cli("rpq", "-o", str(tmp_path / "o"), "--device", "tpu"), "--device")


def test_output_exists(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine").write_text("x")
    assert_one_line_error(run_cli("rpq", "-o", str(tmp_path / "o")), "already exists", "--force")
    assert (tmp_path / "o" / "mine").read_text() == "x"


def test_model_with_no_supported_layers(tmp_path, monkeypatch):
    from model_compress.core.sources import ModelSource
    from model_compress.rpq import pipeline

    monkeypatch.setattr(pipeline, "resolve_source", lambda model: ModelSource("folder", "norm-only"))
    norm_only = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    monkeypatch.setattr(pipeline, "load_config", lambda source: None)
    monkeypatch.setattr(pipeline, "empty_model", lambda config, dtype: norm_only)
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: pytest.fail("the check must come before the weights load"))
    result = run_cli("rpq", "norm-only", "-o", str(tmp_path / "o"))
    assert_one_line_error(result, "no supported layers")
    assert list(tmp_path.iterdir()) == []


def test_failure_during_conversion_leaves_no_folder(tiny_folder, tmp_path, monkeypatch):
    """Ctrl-C while the folder is written: no output folder, half-written or not; the fitted layers are kept for
    --resume in the hidden resume folder, and the line says so."""
    from model_compress.rpq import pipeline

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    source = tiny_folder("llama")
    monkeypatch.setattr(pipeline, "render_model_card", explode)  # fails while the folder is being written
    result = run_cli("rpq", str(source), "-o", str(tmp_path / "o"), "-m", "8", "-k", "16", "--device", "cpu", *QUICK)
    assert result.exit_code == 130
    assert "--resume" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.resume", source.name]
    monkeypatch.undo()
    resumed = run_cli("rpq", str(source), "-o", str(tmp_path / "o"), "-m", "8", "-k", "16", "--device", "cpu", *QUICK, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", source.name]


def test_corrupt_checkpoint_on_load(tiny_folder, tmp_path):
    out = tmp_path / "o"
    assert run_cli("rpq", str(tiny_folder("bert")), "-o", str(out), "-m", "8", "-k", "16", "--device", "cpu", *QUICK).exit_code == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    assert_one_line_error(run_cli("inspect", str(out)), "corrupt or truncated")


def test_inspect_on_something_else(tiny_folder):
    assert_one_line_error(run_cli("inspect", str(tiny_folder("opt"))), "not a model-compress checkpoint")


def test_a_high_measured_error_is_said_with_the_bits_that_keep_it_low(tiny_folder, tmp_path):
    folder = str(tiny_folder("llama"))
    low = run_cli("rpq", folder, "-o", str(tmp_path / "low"), "--bits", "1.5", "--device", "cpu", *QUICK)
    assert low.exit_code == 0, low.output
    assert "expect a large loss of quality" in low.output
    advice = low.output.split("expect a large loss of quality")[1].splitlines()[0]
    assert "--bits" in advice, advice


def test_a_budget_above_every_format_takes_the_dearest_and_no_warning(tmp_path):
    """--bits 16 on layers 256 wide: the dearest formats they allow (D=1, K=32), whose error is low."""
    from ..conftest import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    tiny_tokenizer("llama").save_pretrained(tmp_path / "wide")
    high = run_cli("rpq", str(tmp_path / "wide"), "-o", str(tmp_path / "high"), "--bits", "16", "--device", "cpu", *QUICK)
    assert high.exit_code == 0, high.output
    report = json.loads((tmp_path / "high" / "compression_report.json").read_text())["summary"]
    assert report["bits_per_weight"] > 6 and report["output_error_mean"] < 0.01
    assert "expect a large loss of quality" not in high.output


def test_rpq_head_index_without_calibration_is_one_line(tiny_folder, tmp_path):
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(tmp_path / "out"), "--calib", "none", "--head-index")
    assert_one_line_error(result, "--head-index")


def test_rpq_head_index_is_saved_attached_on_load_and_reported_by_eval(tiny_folder, tmp_path):
    import model_compress
    from model_compress.rpq.head_index.attach import INDEX_FILE, attached

    out = tmp_path / "out"
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(out), "--calib-tokens", "512", "--finetune-steps", "0",
                     "--head-index")
    assert result.exit_code == 0, result.output
    assert "head index:" in result.output and (out / INDEX_FILE).is_file()
    assert json.loads((out / "compression_report.json").read_text())["head_index"]["values_per_code"] == 2
    model = model_compress.load(out).eval()
    assert attached(model) is not None
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        indexed = model(prompt).logits
        attached(model).full_logits = True
        full = model(prompt).logits
    assert indexed.argmax(-1).tolist() == full.argmax(-1).tolist()
    result = run_cli("eval", str(out), "--device", "cpu", "--max-tokens", "512", "--seq-len", "128", "--no-latency", "--no-baseline")
    assert result.exit_code == 0, result.output
    assert "greedy token = dense argmax" in result.output
    quality = json.loads((out / "eval_report.json").read_text())["compressed"]["quality"]
    assert quality["head_index_agreement"] == 1.0 and quality["head_index_positions"] > 0
    assert math.isfinite(quality["perplexity"])  # scored on every logit, not the shortlists' -inf
