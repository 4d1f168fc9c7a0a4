"""``--gpus N``: the command line each process is given (what the user gave, without ``--gpus``), and the one-line
refusals of a ``--gpus`` that cannot run here. The processes themselves run in ``tests/rpq/test_spread.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer
from typer.testing import CliRunner

from model_compress.core.errors import UserError
from model_compress.core.spread_launch import check_spread, given_arguments


def test_each_process_is_given_the_users_arguments_and_options_without_gpus_or_defaults():
    app = typer.Typer()
    seen: list[list[str]] = []

    @app.command()
    def rpq(
        ctx: typer.Context,
        model: Annotated[Optional[str], typer.Argument()] = None,
        output: Annotated[Path, typer.Option("--output", "-o")] = Path("out"),
        bits: Annotated[float, typer.Option()] = 4.5,
        skip: Annotated[Optional[list[str]], typer.Option("--skip")] = None,
        stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
        force: Annotated[bool, typer.Option("--force")] = False,
        gpus: Annotated[int, typer.Option("--gpus")] = 1,
    ) -> None:
        seen.append(given_arguments(ctx))

    @app.command()
    def other() -> None:  # a second command, so that the app keeps its command names
        pass

    runner = CliRunner()
    result = runner.invoke(app, ["rpq", "tiny", "-o", "x", "--skip", "a", "--skip", "b", "--no-stream", "--force", "--gpus", "2"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == ["tiny", "--output", "x", "--skip", "a", "--skip", "b", "--no-stream", "--force"]
    runner.invoke(app, ["rpq", "--bits", "3", "--gpus", "4"])  # no model given: the default is each process's own
    assert seen[-1] == ["--bits", "3.0"]


def test_a_gpus_that_cannot_run_here_is_refused_with_one_line():
    check_spread(1, "auto", {})
    check_spread(2, "cpu", {})  # processes sharing the CPU over gloo
    with pytest.raises(UserError, match="give 1 or more"):
        check_spread(0, "cpu", {})
    with pytest.raises(UserError, match="torchrun already"):
        check_spread(2, "cuda", {"WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="pass --device cuda"):
        check_spread(2, "cuda:1", {})


def test_compress_rpq_with_more_gpus_than_the_machine_has_stops_with_one_line():
    import torch

    from model_compress.cli.app import app

    if torch.cuda.is_available() and torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    result = CliRunner().invoke(app, ["rpq", "-o", "never-written", "--gpus", "64", "--device", "cuda"])
    assert result.exit_code == 1
    assert "--gpus 64: this machine has" in result.output and "Traceback" not in result.output
    assert not Path("never-written").exists()


def test_compress_rpq_gpus_refuses_once_what_every_process_would_refuse(tmp_path):
    from model_compress.cli.app import app

    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, ["rpq", "-o", str(out), "--gpus", "2", "--device", "cpu"])
    assert result.exit_code == 1 and "already exists" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["rpq", "-o", str(tmp_path / "new"), "--gpus", "2", "--device", "cpu", "--resume"])
    assert result.exit_code == 1 and "nothing to resume" in result.output and "Traceback" not in result.output
