"""The compressed checkpoint folder: written whole or not at all, checked before it is loaded.

Folder: config.json (the base config plus ``quantization_config``), model.safetensors (sharded above
MAX_SHARD_SIZE, with its index), tokenizer files, README.md (model card) and
compression_report.json (every figure of the conversion). It is written to a hidden sibling folder
and renamed into place only when complete; an existing folder is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import UserError
from . import methods

CONFIG_FILE = "config.json"
REPORT_FILE = "compression_report.json"
CARD_FILE = "README.md"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "2GB"  # safetensors builds a shard's bytes in host memory before writing it: this bounds that


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse, before any work, to write where the user already has something (unless ``force``)."""
    if out.is_file():
        raise UserError(f"output '{out}' is a file; choose a folder path")
    if out.exists() and not force:
        raise UserError(f"output folder '{out}' already exists; pass --force to replace it")
    ancestor = out.parent
    while not ancestor.exists():  # missing parents are created when the folder is written
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write '{out}': '{ancestor}' is a file")


def write_folder_atomically(out: Path, force: bool, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh hidden sibling folder, then move it to ``out``.

    On any failure (or Ctrl-C) the partial folder is removed and ``out`` is untouched. An existing
    ``out`` is swapped out only after the new folder is complete, and deleted only then.
    """
    check_output_folder(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        follow_umask(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def follow_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode the user's umask gives new files.

    Writers that go through a temporary file (safetensors, for one) leave it at 0600; the folder was
    made by us. A user who shares a model folder expects the modes of everything else they write.
    """
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def weights_bytes(path: Path) -> int:
    """Bytes of a checkpoint folder's weight files on disk."""
    return sum(file.stat().st_size for file in weight_files(path))


def read_compression_config(path: Path) -> dict:
    """The ``quantization_config`` of an RPQ or FFF checkpoint folder, or a UserError saying what is wrong."""
    if not path.exists():
        raise UserError(f"'{path}' does not exist")
    if not path.is_dir():
        raise UserError(f"'{path}' is not a folder (a compressed checkpoint is a folder)")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"'{path}' is not a compressed checkpoint: no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"'{config_path}' is not valid JSON: {error}") from None
    section = config.get("quantization_config") or {}
    if section.get("quant_method") not in methods.names():
        raise UserError(
            f"'{path}' is not a model-compress checkpoint (its config has no {' or '.join(methods.names())} quantization_config)"
        )
    return section


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index lists)."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"'{index}' is not a valid safetensors index: {error}") from None
        return [path / name for name in names]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise UserError(f"'{path}' has no {WEIGHTS_FILE}: the checkpoint is incomplete")


def validate_checkpoint(path: Path) -> dict:
    """Check a folder before loading it: config, every weight file readable, every tensor its method names present.

    A truncated or corrupt safetensors file, a missing shard, or codes whose shape or dtype disagree
    with the config each give one UserError line instead of a traceback deep inside transformers.
    """
    section = read_compression_config(path)
    headers: dict[str, tuple[list[int], str]] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise UserError(f"'{file}' is missing: the checkpoint is incomplete")
        for name, shape, dtype in _tensor_headers(file):
            headers[name] = (shape, dtype)
    methods.method_of(section).check_tensors(section, _as_module_names(headers, path))
    return section


def _as_module_names(headers: dict[str, tuple[list[int], str]], path: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor names as the model's modules know them: transformers saves some under older checkpoint names
    (GPT-NeoX's ``lm_head`` as ``embed_out``) and renames them on load; the same renaming applies here."""
    try:
        config = json.loads((path / "config.json").read_text())
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except (OSError, ValueError, ImportError):  # an older transformers renames nothing
        return headers
    keys = [*(config.get("architectures") or []), config.get("model_type")]
    renamings = next((found for key in keys if key and (found := get_checkpoint_conversion_mapping(key))), None) or []
    pairs = [
        (source, target)
        for rule in renamings if isinstance(rule, WeightRenaming)
        for source, target in zip(rule.source_patterns, rule.target_patterns)
    ]
    if not pairs:
        return headers
    renamed = {}
    for name, header in headers.items():
        for source, target in pairs:
            name = re.sub(source, target, name)
        renamed[name] = header
    return renamed


def _tensor_headers(file: Path) -> Iterator[tuple[str, list[int], str]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                sliced = handle.get_slice(name)
                yield name, list(sliced.get_shape()), sliced.get_dtype()
    except (SafetensorError, OSError) as error:
        raise UserError(f"'{file}' is corrupt or truncated ({error})") from None


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         decode_weights: bool = False) -> nn.Module:
    """Load a compressed checkpoint folder as a ready model (eval mode) on ``device``.

    Equivalent to ``AutoModel*.from_pretrained(path)`` after ``import model_compress``, with the
    folder checked first so that a broken checkpoint gives one clear error.

    ``decode_weights``: every compressed layer also keeps its weight decoded once, in 16 bits (the model's dtype
    where it is 16-bit, else float16), and multiplies with it: a CPU then runs plain matrix products, at two
    bytes per weight more memory (still half of a float32 original). Not saved; the codes stay.
    """
    from . import methods
    from .sources import from_pretrained

    path = Path(path)
    validate_checkpoint(path)
    model = from_pretrained(path, str(path), dtype)
    model = model.to(device) if device is not None else model
    if decode_weights:
        methods.decode_weights(model, decoded_dtype(model))
    return model


def decoded_dtype(model: nn.Module) -> torch.dtype:
    """What ``load(decode_weights=True)`` decodes into: the model's dtype where it is 16-bit, else float16 (a CPU
    multiplies float16 weights as fast as float32 ones, measured on 2 cores, at half the bytes)."""
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def load_original(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The original model a compressed folder was made from (eval mode), loaded the way the tool loaded it.

    The folder records where its original came from (the embedded default, a GGUF file, a folder or a
    hub id); this loads that one, the GGUF dequantized as transformers does, so that a user can compare
    both in Python as ``compress eval`` does. One clear error if the recorded original is gone.
    """
    from .sources import load_model, original_source

    source = original_source(read_compression_config(Path(path)), None)
    model, _ = load_model(source, dtype)
    model.eval()
    return model.to(device) if device is not None else model
