"""A conversion that can stop and go on: what it has done is saved as it is done, beside the output folder.

``.OUT.resume/`` (a hidden sibling of the output folder) holds:
  * ``state.json``: what the run was started with (its fingerprint: the source's files, every setting, the
    calibration windows' digest, the tool version), the allocation (every layer's format and its candidates),
    and each finished layer's figures and the file that holds its tensors;
  * ``sensitivity.safetensors``: the layers' Fisher weights;
  * ``teacher.safetensors``: the original model's outputs on the calibration windows (top-k log-probabilities and
    their ids per token), the targets of fine-tuning, saved once recorded so that a resumed run need not record them;
  * ``layers-NNNNN.safetensors``: the converted layers' tensors, one file per block as each block finishes.
A run that stops (Ctrl-C, a crash, a lost machine) keeps the folder; ``--resume`` checks that the fingerprint is the
same (one line naming the first difference when it is not), puts the finished layers back, and fits the rest from
the first unfinished block on, each block on what the finished ones produce: on a CPU, the same checkpoint bit for
bit as a run that never stopped. The folder is removed once the output folder is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core.errors import UserError
from ..core.workers import Workers
from .fit.allocate import Option
from .fit.finetune import Teacher
from .fit.formats import CodeFormat
from .fit.sensitivity import Sensitivity

STATE_FILE = "state.json"
SENSITIVITY_FILE = "sensitivity.safetensors"
TEACHER_FILE = "teacher.safetensors"


def resume_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.resume"


def check_resumable(out: Path, resume: bool) -> None:
    """``--resume`` needs a stopped conversion into ``out``: one line where there is none."""
    folder = resume_folder(out)
    if resume and not folder.exists():
        raise UserError(f"--resume: nothing to resume for '{out}' (no stopped conversion at '{folder}')")


def digest(tensor: Tensor) -> str:
    """A short digest of a tensor's bytes (the calibration windows: same text, tokenizer and windows)."""
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def source_files(path: Path) -> dict[str, list[int]]:
    """Size and modification time of the source's files (a folder's weights and config, or one GGUF file)."""
    files = [path] if path.is_file() else sorted(
        p for pattern in ("*.safetensors", "*.gguf", "*.bin", "*.json") for p in path.glob(pattern)
    )
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


class ResumeStore:
    """The resume folder of one output folder: opened fresh, or reopened for ``--resume`` after checking it matches.

    In a run spread over several processes (``core.workers``) the leader opens and checks it and hands its state to
    the others, which read what a stopped run saved and write nothing but their own share of the teacher's outputs
    (each process records the windows it ran); every process thus decides alike, and its collectives stay in step.
    """

    def __init__(self, folder: Path, state: dict[str, Any], workers: Workers | None = None) -> None:
        self.folder, self.state = folder, state
        self.workers = workers or Workers()
        self.teacher: Teacher | None = None  # the run's teacher (this process's share), saved by ``teacher_recorded``

    @classmethod
    def open(cls, out: Path, fingerprint: dict[str, Any], resume: bool, force: bool,
             workers: Workers | None = None) -> ResumeStore:
        workers = workers or Workers()
        if not workers.spread:
            return cls(resume_folder(out), cls._opened_state(out, fingerprint, resume, force), workers)
        opened: tuple[dict[str, Any] | None, str | None] = (None, None)
        if workers.leader:
            try:
                opened = (cls._opened_state(out, fingerprint, resume, force), None)
            except UserError as error:
                opened = (None, str(error))
        state, refusal = workers.broadcast(opened, 0)
        if refusal is not None:
            raise UserError(refusal)
        return cls(resume_folder(out), state, workers)

    @classmethod
    def _opened_state(cls, out: Path, fingerprint: dict[str, Any], resume: bool, force: bool) -> dict[str, Any]:
        """The state of the resume folder of ``out``: a stopped run's, checked against ``fingerprint``, or a new
        folder's (made here)."""
        folder = resume_folder(out)
        if folder.exists() and resume:
            try:
                state = json.loads((folder / STATE_FILE).read_text())
            except (OSError, ValueError) as error:
                raise UserError(f"--resume: cannot read '{folder / STATE_FILE}' ({error}); pass --force to start over") from None
            difference = first_difference(state.get("fingerprint", {}), fingerprint)
            if difference is not None:
                raise UserError(f"--resume: {difference} differs from the stopped run's; rerun with its settings, or pass --force to start over")
            return state
        check_resumable(out, resume)
        if folder.exists():
            if not force:
                raise UserError(f"a stopped conversion into '{out}' is saved at '{folder}': pass --resume to go on with it, "
                                "or --force to start over")
            shutil.rmtree(folder)
        store = cls(folder, {"fingerprint": fingerprint, "allocation": None, "layers": {}, "files": 0, "sensitivity": False})
        store._guarded(lambda: folder.mkdir(parents=True))
        store._write_state()
        return store.state

    # -- what was done ------------------------------------------------------------------------------------

    @property
    def finished(self) -> dict[str, dict[str, Any]]:
        """Finished layers: name -> their figures (``LayerResult`` fields) and the file of their tensors."""
        return self.state["layers"]

    def sensitivity(self) -> dict[str, Sensitivity] | None:
        path = self.folder / SENSITIVITY_FILE
        if not self.state.get("sensitivity", path.is_file()):  # a spread run: as the state says (the leader writes it)
            return None
        tensors = load_file(str(path))
        names = {key.rsplit(".", 1)[0] for key in tensors}
        return {name: Sensitivity(tensors[f"{name}.fisher"], tensors[f"{name}.energy"]) for name in names}

    def allocation(self) -> dict[str, Any] | None:
        """The saved allocation: ``chosen`` (name -> Option), ``options`` (name -> list of Option) and the rest."""
        saved = self.state["allocation"]
        if saved is None:
            return None
        chosen = {name: _option(entry) for name, entry in saved["chosen"].items()}
        options = {name: [_option(entry) for entry in entries] for name, entries in saved["options"].items()}
        return {**saved, "chosen": chosen, "options": options}

    def saved_teacher(self) -> Teacher | None:
        """This process's share of the teacher a stopped run saved; None unless every process's share was saved (so
        that all of them decide alike whether to record it again)."""
        paths = [self._teacher_path(rank) for rank in range(self.workers.world)]
        if not all(path.is_file() for path in paths):
            return None
        return Teacher.from_tensors(load_file(str(paths[self.workers.rank])))

    def _teacher_path(self, rank: int | None = None) -> Path:
        """A process's teacher file: one for a lone process, one per process (its share) in a spread run."""
        if not self.workers.spread:
            return self.folder / TEACHER_FILE
        return self.folder / f"teacher-{self.workers.rank if rank is None else rank}-of-{self.workers.world}.safetensors"

    def layer_tensors(self, name: str) -> dict[str, Tensor]:
        stored = load_file(str(self.folder / self.finished[name]["file"]))
        prefix = f"{name}."
        return {key[len(prefix):]: value for key, value in stored.items() if key.startswith(prefix)}

    # -- saving as it goes --------------------------------------------------------------------------------

    def save_sensitivity(self, sensitivity: dict[str, Sensitivity]) -> None:
        tensors = {}
        for name, entry in sensitivity.items():
            tensors[f"{name}.fisher"], tensors[f"{name}.energy"] = entry.fisher.contiguous(), entry.energy.contiguous()
        if self.workers.leader:
            self._guarded(lambda: save_file(tensors, str(self.folder / SENSITIVITY_FILE)))
        self.state["sensitivity"] = True
        self._write_state()

    def teacher_recorded(self) -> None:
        """Called once the pass that records the teacher has run: save it (when the run has one)."""
        path = self._teacher_path()
        if self.teacher is not None and not path.is_file():
            tensors = self.teacher.tensors()
            self._guarded(lambda: save_file(tensors, str(path)))

    def save_allocation(self, chosen: dict[str, Option], options: dict[str, list[Option]], extra: dict[str, Any]) -> None:
        self.state["allocation"] = {
            "chosen": {name: _option_json(option) for name, option in chosen.items()},
            "options": {name: [_option_json(option) for option in entries] for name, entries in options.items()},
            **extra,
        }
        self._write_state()

    def save_layers(self, modules: dict[str, nn.Module], figures: dict[str, dict[str, Any]]) -> None:
        """The tensors of newly finished layers in one file, then their figures in the state (in that order: a stop
        between the two leaves an unlisted file, never a listed layer without its tensors)."""
        if not modules:
            return
        name = f"layers-{self.state['files']:05d}.safetensors"
        if self.workers.leader:  # every process holds every finished layer: the leader saves them
            tensors = {f"{layer}.{key}": value.detach().cpu().contiguous()
                       for layer, module in modules.items() for key, value in module.state_dict().items()}
            self._guarded(lambda: save_file(tensors, str(self.folder / name)))
        self.state["files"] += 1
        for layer in modules:
            self.finished[layer] = {**figures[layer], "file": name}
        self._write_state()

    @property
    def holds_work(self) -> bool:
        """Anything saved beyond the fingerprint: the Fisher weights, the allocation, the teacher or a layer."""
        return bool(self.finished) or self.state["allocation"] is not None or (self.folder / SENSITIVITY_FILE).is_file() \
            or any(self.folder.glob("teacher*.safetensors"))

    def remove(self) -> None:
        if self.workers.leader:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _write_state(self) -> None:
        if not self.workers.leader:  # the others keep theirs in memory, the same as the leader's
            return

        def write() -> None:
            partial = self.folder / f"{STATE_FILE}.partial"
            partial.write_text(json.dumps(self.state, indent=1))
            os.replace(partial, self.folder / STATE_FILE)
        self._guarded(write)

    def _guarded(self, write) -> None:
        """Run a write; a full disk becomes one line that says the work so far is kept."""
        try:
            write()
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"the disk is full: the conversion so far is kept in '{self.folder}'; free some space "
                                "and run the same command with --resume") from None
            raise


def first_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first entry (in ``now``'s order, nested entries by their path) whose value differs, with both values;
    None when all agree."""
    then, current = _flat(saved), _flat(json.loads(json.dumps(now)))
    for key in [*current, *(k for k in then if k not in current)]:
        if then.get(key) != current.get(key):
            return f"{key} ({_shown(then.get(key))} then, {_shown(current.get(key))} now)"
    return None


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flat(inner, f"{path}.{key}" if path else str(key)))
        return flat
    return {path: value}


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _option_json(option: Option) -> dict[str, Any]:
    """An option as saved: its format (with the scale's cost, which the allocation counted), bits and error. JSON
    writes floats so that they read back the same."""
    return {"format": {**option.choice.to_json(), "scale_bytes": option.choice.scale_bytes}, "bits": option.bits,
            "error": option.error}


def _option(entry: dict[str, Any]) -> Option:
    spec = entry["format"]
    return Option(CodeFormat(spec["num_codebooks"], spec["codebook_size"], spec["codebook_dtype"], spec["scale_bytes"]),
                  entry["bits"], entry["error"])


def restore_module(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Fill an empty RPQ module (possibly on the meta device) with saved tensors, as they were saved."""
    module.load_state_dict(tensors, strict=True, assign=True)
