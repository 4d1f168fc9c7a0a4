"""``--gpus N``: the same command run again as N processes, one per GPU, by torch's elastic launcher (what ``torchrun
--standalone --nproc-per-node N`` does), so a user need not know torchrun.

The processes join one process group from torchrun's environment at the edge (``core.workers.from_launcher``); this
module only starts them. Each is given the options the user gave (not the defaults, which each process works out
itself), without ``--gpus``. On a CPU (``--device cpu``) the processes share it over gloo: that spreads nothing useful,
but it runs the spread path where no GPU is, which is how it is tested.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Mapping
from typing import Any

from .errors import UserError

SPREAD_OPTION = "gpus"


def given_arguments(ctx: Any, leave_out: str = SPREAD_OPTION) -> list[str]:
    """The command line that gives ``ctx``'s command (a click context) what the user gave it: arguments, and the
    options not left at their defaults, each in its first spelling (a flag pair by the side chosen); ``leave_out`` is
    dropped. Read by duck typing: Typer may bring its own copy of click, whose classes are not ``click``'s."""
    line: list[str] = []
    for param in ctx.command.params:
        if param.name == leave_out or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            line += [str(v) for v in (value if param.multiple or param.nargs != 1 else [value]) if v is not None]
            continue
        source = ctx.get_parameter_source(param.name)
        if param.param_type_name != "option" or source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        if param.is_flag and param.secondary_opts:
            line.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                line.append(param.opts[0])
        elif value is not None:
            for item in value if param.multiple else [value]:
                line += [param.opts[0], str(item)]
    return line


def check_spread(processes: int, device: str, environ: Mapping[str, str] = os.environ) -> None:
    """One clear line for a ``--gpus`` that cannot run here."""
    if processes < 1:
        raise UserError(f"--gpus {processes}: give 1 or more")
    if processes == 1:
        return
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--gpus: this process was started by torchrun already; give one of the two")
    if device.startswith("cuda:"):
        raise UserError(f"--gpus {processes} --device {device}: each process takes its own GPU; pass --device cuda")
    if device == "cpu":
        return
    require_gpus(processes, hint="; --device cpu runs the processes on the CPU")


def require_gpus(count: int, first: int = 0, hint: str = "") -> None:
    """One clear line where this machine has no ``count`` CUDA GPUs from index ``first`` on (``hint`` added where it
    has none at all)."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if first + count > available:
        start = f" from cuda:{first}" if first else ""
        raise UserError(f"--gpus {count}{start}: this machine has {available} CUDA GPU{'s' if available != 1 else ''}"
                        + ("" if available else hint))


def run_spread(ctx: Any, processes: int) -> None:
    """Run ``ctx``'s command as ``processes`` processes of ``python -m model_compress.cli`` (the user's options,
    without ``--gpus``) and wait for them; a process that fails ends the run with one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    command = [ctx.info_name or "", *given_arguments(ctx)]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:  # as torchrun does: N processes must not each take every core (the children inherit it)
        os.environ["OMP_NUM_THREADS"] = "1"
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its per-process failure lines repeat what the processes and the line below say
    try:
        elastic_launch(config, sys.executable)("-m", "model_compress.cli", *command)
    except ChildFailedError as error:
        failed = sorted(rank for rank, failure in error.failures.items() if failure.exitcode > 0) or sorted(error.failures)
        if len(failed) == processes:
            raise UserError(f"--gpus {processes}: every process failed (their messages are above)") from None
        raise UserError(f"--gpus {processes}: process {', '.join(map(str, failed))} of {processes} failed (its message is "
                        "above); the others were stopped") from None
    finally:
        elastic_log.setLevel(level)
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
