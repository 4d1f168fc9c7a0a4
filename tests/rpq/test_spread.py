"""A conversion spread over two processes (torch.distributed, gloo on the CPU) sums the same second moments and fits
the same model as one process alone: each process runs half the calibration batches, the statistics are summed
across them, and each layer group is fitted by one process and handed to the other."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_compress.core.text import Text
from model_compress.core.workers import Workers, from_launcher
from model_compress.rpq import layer_steps
from model_compress.rpq.convert import RPQSettings, convert_model
from model_compress.rpq.fit.calibration import CalibrationSet

from ..conftest import VOCAB, tiny_model

SEQ = 32


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _convert(rank: int, world: int, port: int, out: str) -> None:
    """One process's conversion of the same tiny model on the same windows; its model and the summed moments saved."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    layer_steps.CALIBRATION_TOKENS_PER_BATCH = 2 * SEQ  # two windows a batch: 6 batches, 3 for each of two processes
    moments: list[dict[str, torch.Tensor]] = []
    summed = layer_steps.summed

    def recording(statistics, workers):
        result = summed(statistics, workers)
        moments.append({name: moment.sum.clone() for name, moment in result.inputs.moments.items()})
        return result

    layer_steps.summed = recording
    fits = []  # the Linear groups this process fitted itself
    fit_rows_group = layer_steps.fit_rows_group
    layer_steps.fit_rows_group = lambda weights, *args: fits.append(len(weights)) or fit_rows_group(weights, *args)
    generator = torch.Generator().manual_seed(0)
    windows = CalibrationSet(torch.randint(3, VOCAB, (12, SEQ), generator=generator), torch.empty(0, SEQ, dtype=torch.long),
                             Text("random", "test", []), 12 * SEQ)
    model = tiny_model("llama")
    convert_model(model, RPQSettings(bits=4.5), windows, workers=Workers(rank, world))
    torch.save({"state": model.state_dict(), "moments": moments, "fits": fits}, Path(out) / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, out: Path) -> list[dict]:
    mp.spawn(_convert, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def test_two_processes_sum_the_same_moments_and_fit_the_same_model_as_one(tmp_path):
    (alone_dir := tmp_path / "one").mkdir()
    (spread_dir := tmp_path / "two").mkdir()
    (alone,) = _run(1, alone_dir)
    first, second = _run(2, spread_dir)
    assert len(alone["moments"]) == len(first["moments"]) > 0
    for one, *two in zip(alone["moments"], first["moments"], second["moments"]):
        assert one.keys() == two[0].keys() == two[1].keys()
        for name in one:
            # float64 sums of the same float32 batch products, added in another order
            torch.testing.assert_close(two[0][name], one[name], rtol=1e-12, atol=0)
            assert torch.equal(two[0][name], two[1][name])
    for name, tensor in alone["state"].items():
        assert torch.equal(first["state"][name], tensor), name
        assert torch.equal(second["state"][name], tensor), name
    # the fits were shared out: each process fitted some groups, together every group once
    assert first["fits"] and second["fits"] and sum(first["fits"] + second["fits"]) == sum(alone["fits"])


def test_a_process_not_started_by_torchrun_works_alone():
    workers = from_launcher({})
    assert workers == Workers() and workers.leader and not workers.spread
    assert workers.share([1, 2, 3]) == [1, 2, 3] and workers.gather(5) == [5] and workers.broadcast(7, 0) == 7
    assert [Workers(1, 3).owner(n) for n in range(4)] == [0, 1, 2, 0]
    assert Workers(1, 3).share(list(range(8))) == [1, 4, 7]


def test_compress_rpq_with_gpus_2_writes_the_checkpoint_one_process_writes(tiny_folder, tmp_path):
    """``--gpus 2`` (torch's elastic launcher, as torchrun, underneath) on the CPU: two gloo processes."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    folder = tiny_folder("llama")
    # 20,000 tokens in windows of 32: three batches of 256 windows, two for the first process and one for the second;
    # fine-tuning splits each step's windows between them and sums the gradients, which differ from one process's in
    # float rounding only; Adam's steps move each weight by about the learning rate, so those differences fall below
    # the weights' float32 spacing and the checkpoints come out the same
    common = ["rpq", str(folder), "--device", "cpu", "--calib-tokens", "20000", "--calib-seq-len", "32", "--finetune-steps", "3"]
    alone = subprocess.run([sys.executable, "-m", "model_compress.cli.app", *common, "-o", str(tmp_path / "one")],
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    spread = subprocess.run([sys.executable, "-m", "model_compress.cli.app", *common, "-o", str(tmp_path / "two"), "--gpus", "2"],
                            capture_output=True, text=True, timeout=600)
    assert spread.returncode == 0, spread.stderr[-2000:]
    assert spread.stdout.count("RPQ conversion") == 1  # the leader's table alone
    finetuned = json.loads((tmp_path / "two" / "compression_report.json").read_text())["summary"]["finetune"]
    assert finetuned["best_step"] > 0  # a trained state was kept: the data-parallel steps are in what is compared
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        assert torch.equal(two[name], tensor), name
