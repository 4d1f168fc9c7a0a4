"""A conversion that stops and goes on with --resume: the same checkpoint bit for bit as one that never stopped, and a
clear line where the resumed run does not match the stopped one."""

from __future__ import annotations

import errno

import pytest
import torch

from model_compress.core.errors import UserError
from model_compress.rpq import resume as resume_module
from model_compress.rpq.convert import RPQSettings
from model_compress.rpq.fit.finetune import FinetuneSettings
from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq
from model_compress.rpq.resume import resume_folder

from ..conftest import ENGLISH, assert_one_line_error, run_cli, stop_after, tiny_model, tiny_tokenizer


@pytest.fixture
def source(tmp_path):
    def make(arch: str):
        folder = tmp_path / f"source-{arch}"
        tiny_model(arch).save_pretrained(folder, max_shard_size="100KB")
        tiny_tokenizer(arch).save_pretrained(folder)
        text = tmp_path / "text.txt"
        text.write_text(ENGLISH * 4)
        return folder, dict(calibration=CalibrationOptions(text=text, tokens=1024, seq_len=64),
                            finetuning=FinetuneSettings(steps=2))
    return make


@pytest.mark.parametrize("arch,stream,layers", [("llama", True, 9), ("gpt2", False, 6), ("bert", True, 12)])
def test_a_resumed_conversion_equals_one_that_never_stopped(source, tmp_path, monkeypatch, arch, stream, layers):
    """Stopped in the fitting pass after the teacher's outputs were saved: the resumed run reads them back instead of
    running the original again, fits the rest and fine-tunes to the same tensors."""
    from model_compress.rpq import convert, layer_steps

    folder, options = source(arch)
    whole = compress_rpq(str(folder), tmp_path / "whole", RPQSettings(bits=4.5), stream=stream, **options).model.state_dict()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        compress_rpq(str(folder), out, RPQSettings(bits=4.5), stream=stream, observer=stop_after(layers), **options)
    assert resume_folder(out).is_dir() and not out.exists()
    assert (resume_folder(out) / "teacher.safetensors").is_file()
    real_pass = convert.run_pass

    def no_teacher_pass(*args, **kwargs):
        assert kwargs.get("on_output") is None, "recorded the teacher again"
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(convert, "run_pass", no_teacher_pass)
    monkeypatch.setattr(layer_steps.LayerSteps, "measure_statistics", lambda *a: pytest.fail("measured again"))
    resumed = compress_rpq(str(folder), out, RPQSettings(bits=4.5), stream=stream, resume=True, **options)
    state = resumed.model.state_dict()
    assert state.keys() == whole.keys()
    assert all(torch.equal(state[key], whole[key]) for key in whole)
    assert not resume_folder(out).exists()  # removed once the output folder is complete


def test_the_gpu_running_out_of_memory_is_one_line_that_keeps_the_work(source, tmp_path):
    folder, options = source("llama")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"the GPU ran out of memory \(6\.00 GiB more were asked for\); the work so far "
                                        r"\(7 layers fitted\) is kept in .*--finetune-checkpointing on.*--resume to go on"):
        compress_rpq(str(folder), out, RPQSettings(bits=4.5), observer=stop_after(9, torch.cuda.OutOfMemoryError), **options)
    assert resume_folder(out).is_dir() and not out.exists()


def test_a_resume_with_other_settings_names_the_first_difference(source, tmp_path):
    folder, options = source("llama")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress_rpq(str(folder), out, RPQSettings(bits=4.5), observer=stop_after(9), **options)
    with pytest.raises(UserError, match=r"--resume: settings\.bits \(4\.5 then, 4\.0 now\) differs"):
        compress_rpq(str(folder), out, RPQSettings(bits=4.0), resume=True, **options)


def test_a_stopped_run_is_neither_resumed_nor_overwritten_unasked(source, tmp_path):
    folder, options = source("llama")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="nothing to resume"):
        compress_rpq(str(folder), out, RPQSettings(bits=4.5), resume=True, **options)
    with pytest.raises(KeyboardInterrupt):
        compress_rpq(str(folder), out, RPQSettings(bits=4.5), observer=stop_after(9), **options)
    with pytest.raises(UserError, match="pass --resume to go on with it, or --force to start over"):
        compress_rpq(str(folder), out, RPQSettings(bits=4.5), **options)
    compress_rpq(str(folder), out, RPQSettings(bits=4.5), force=True, **options)  # --force: starts over
    assert out.is_dir() and not resume_folder(out).exists()


def test_a_full_disk_keeps_the_work_for_resume_in_one_line(source, tmp_path, monkeypatch):
    folder, _ = source("llama")
    calls = {"count": 0}
    real = resume_module.save_file

    def fills_up(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(resume_module, "save_file", fills_up)
    result = run_cli("rpq", str(folder), "-o", str(tmp_path / "out"), "--calib", str(tmp_path / "text.txt"),
                     "--calib-tokens", "1024", "--calib-seq-len", "64", "--finetune-steps", "0")
    assert_one_line_error(result, "the disk is full", "--resume")
    assert resume_folder(tmp_path / "out").is_dir() and not (tmp_path / "out").exists()
