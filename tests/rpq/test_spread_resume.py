"""A conversion spread over two processes (gloo on the CPU) that stops and goes on with --resume: the same checkpoint,
bit for bit, as a spread run that never stopped; a resume with another number of processes is refused in one line."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_compress.core.errors import UserError
from model_compress.core.workers import Workers
from model_compress.rpq import layer_steps
from model_compress.rpq.convert import RPQSettings
from model_compress.rpq.fit.finetune import FinetuneSettings
from model_compress.rpq.pipeline import CalibrationOptions, compress_rpq
from model_compress.rpq.resume import resume_folder

from ..conftest import ENGLISH, stop_after, tiny_model, tiny_tokenizer


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _convert(rank: int, world: int, port: int, folder: str, out: str, text: str, mode: str) -> None:
    """One process's part of a run: ``whole`` (never stopped), ``stop`` (Ctrl-C after some layers) or ``resume``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layer_steps.CALIBRATION_TOKENS_PER_BATCH = 2 * 64  # two windows a batch: enough batches for two processes
    try:
        options = dict(calibration=CalibrationOptions(text=Path(text), tokens=1024, seq_len=64),
                       finetuning=FinetuneSettings(steps=2), workers=Workers(rank, world), stream=True)
        outcome = "finished"
        try:
            run = compress_rpq(folder, Path(out), RPQSettings(bits=4.5), resume=mode == "resume",
                               observer=stop_after(9) if mode == "stop" else None, **options)
            torch.save(run.model.state_dict(), Path(out).parent / f"{Path(out).name}-rank{rank}.pt")
        except KeyboardInterrupt as stop:
            outcome = f"stopped: {stop}"
        (Path(out).parent / f"{Path(out).name}-rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, folder: Path, out: Path, text: Path, mode: str) -> list[str]:
    mp.spawn(_convert, args=(world, _free_port(), str(folder), str(out), str(text), mode), nprocs=world, join=True)
    return [(out.parent / f"{out.name}-rank{rank}.txt").read_text() for rank in range(world)]


def test_a_resumed_spread_conversion_equals_a_spread_one_that_never_stopped(tmp_path):
    folder = tmp_path / "source"
    tiny_model("llama").save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer("llama").save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(ENGLISH * 4)
    assert _spawn(2, folder, tmp_path / "whole", text, "whole") == ["finished", "finished"]
    out = tmp_path / "out"
    outcomes = _spawn(2, folder, out, text, "stop")
    assert all(o.startswith("stopped: the work so far") and "--resume" in o for o in outcomes), outcomes
    kept = resume_folder(out)
    assert kept.is_dir() and not out.exists()
    assert sorted(p.name for p in kept.glob("teacher*")) == ["teacher-0-of-2.safetensors", "teacher-1-of-2.safetensors"]
    with pytest.raises(UserError, match="processes"):  # one process where two stopped: the batches would differ
        compress_rpq(str(folder), out, RPQSettings(bits=4.5), resume=True,
                     calibration=CalibrationOptions(text=text, tokens=1024, seq_len=64), finetuning=FinetuneSettings(steps=2))
    assert _spawn(2, folder, out, text, "resume") == ["finished", "finished"]
    assert out.is_dir() and not kept.exists()
    whole = torch.load(tmp_path / "whole-rank0.pt")
    for rank in range(2):
        resumed = torch.load(tmp_path / f"out-rank{rank}.pt")
        assert resumed.keys() == whole.keys()
        assert all(torch.equal(resumed[key], whole[key]) for key in whole), rank
