"""A head index put on a model, kept beside its checkpoint, and put back when the checkpoint loads.

The model's output embedding module stays where it is, with its weights and names (a tied head stays tied, the
checkpoint's keys do not change): ``attach`` only gives that module instance the certified forward of
``module.CertifiedForward``, and ``detach`` takes it away. The index itself is saved as ``head_index.safetensors``
beside the weights (``save_index`` / ``load_index``), so a checkpoint with an index still loads anywhere as a plain
model; ``model_compress.load`` and ``from_pretrained`` (through the RPQ quantizer) put it back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ...core.errors import UserError
from ...core.placement import return_tensors, tensor_devices
from ..fit.stack import call_model
from ..kernels.plans import invalidate_all
from .index import PQHeadIndex, build_index
from .module import CertifiedForward

INDEX_FILE = "head_index.safetensors"
DEFAULT_PIECE = 2  # values per 8-bit code: 4 bits per weight, what certifies a real head's shortlists (RESULTS.md)
MOST_STATES = 16384  # hidden states the index is fitted on: the clustering's and the metric's data


def head_rows(head: nn.Module) -> Tensor:
    """The head's exact rows (V, width) in float32: a dense Linear's weight, or the rows an RPQ head decodes to."""
    if isinstance(getattr(head, "weight", None), Tensor) and head.weight.dim() == 2:
        return head.weight.detach().float()
    if hasattr(head, "dequantize"):
        return head.dequantize().detach().float()
    raise ValueError(f"{type(head).__name__} is not a head the index can read (a Linear, or an RPQ head)")


def index_head(model: nn.Module, hidden_states: Tensor, piece: int = DEFAULT_PIECE, first_rows: int = 64,
               seed: int = 0) -> CertifiedForward:
    """Build an index of ``model``'s output embeddings from ``hidden_states`` (n, width: what the head reads on
    calibration text) and attach it; returns the attached forward (its ``fallbacks`` and ``positions`` count)."""
    head = model.get_output_embeddings()
    rows = head_rows(head)
    width = rows.shape[1]
    if width % piece:
        raise ValueError(f"{piece} values per code do not divide the head's width {width}")
    dtype = _value_dtype(model)
    index = build_index(rows.to(hidden_states.device), width // piece, 256, hidden_states=hidden_states.float(), seed=seed,
                        value_dtype=dtype)
    return attach(model, index.to(torch.device("cpu")), first_rows)


def head_inputs(model: nn.Module, windows: Tensor, device: torch.device, most: int) -> Tensor:
    """What the head reads at the first ``most`` positions of ``windows`` (n, seq) token ids, the model on ``device``
    (an attached index computes every logit meanwhile: its shortlists are not what is measured)."""
    head = model.get_output_embeddings()
    certified = attached(model)
    states: list[Tensor] = []
    grab = head.register_forward_pre_hook(lambda module, args: states.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    kept = certified is not None and certified.full_logits
    if certified is not None:
        certified.full_logits = True
    try:
        with torch.no_grad():
            for window in windows:
                if sum(len(s) for s in states) >= most:
                    break
                call_model(model, window[None].to(device))
    finally:
        grab.remove()
        if certified is not None:
            certified.full_logits = kept
    return torch.cat(states)[:most]


def calibrated_index(model: nn.Module, windows: Tensor, device: torch.device, piece: int = DEFAULT_PIECE,
                     most_states: int = MOST_STATES) -> CertifiedForward:
    """Index ``model``'s head on the hidden states it reads over calibration ``windows`` (n, seq) token ids, up to
    ``most_states`` of them, on ``device``; attached, and every tensor of the model back where it was after."""
    if model.get_output_embeddings() is None:
        raise UserError("--head-index: this model has no language-model head to index")
    homes = tensor_devices(model)
    try:
        nn.Module.to(model, device)
        invalidate_all()  # launch plans kept by the layers hold the tensors just moved
        return index_head(model, head_inputs(model, windows, device, most_states).float(), piece)
    finally:
        return_tensors(model, homes)
        invalidate_all()


def attach(model: nn.Module, index: PQHeadIndex, first_rows: int = 64) -> CertifiedForward:
    """Give the model's output embedding module the certified forward over ``index``."""
    head = model.get_output_embeddings()
    detach(model)
    certified = CertifiedForward(head, index, first_rows)
    head.forward = certified
    return certified


def detach(model: nn.Module) -> PQHeadIndex | None:
    """Back to the head's own forward; the index it had, if any."""
    head = model.get_output_embeddings()
    certified = head.__dict__.get("forward")
    if isinstance(certified, CertifiedForward):
        del head.forward
        return certified.index
    return None


def attached(model: nn.Module) -> CertifiedForward | None:
    head = model.get_output_embeddings()
    found = None if head is None else head.__dict__.get("forward")
    return found if isinstance(found, CertifiedForward) else None


def save_index(folder: Path, certified: CertifiedForward) -> None:
    """``head_index.safetensors`` in ``folder``: the index's tensors and its settings as metadata."""
    index = certified.index
    tensors = {"centroids": index.centroids, "codes": index.codes, "row_error": index.row_error}
    if index.metric_inverse is not None:
        tensors.update(metric_error=index.metric_error, metric_inverse=index.metric_inverse)
    settings = {"largest_row_norm": index.largest_row_norm, "first_rows": certified.first_rows, "format_version": 1}
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(Path(folder) / INDEX_FILE),
              metadata={"head_index": json.dumps(settings)})


def load_index(path: Path) -> tuple[PQHeadIndex, int]:
    """The index stored at ``path`` and its first shortlist size."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        settings = json.loads(handle.metadata()["head_index"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    index = PQHeadIndex(tensors["centroids"], tensors["codes"], tensors["row_error"], settings["largest_row_norm"],
                        tensors.get("metric_error"), tensors.get("metric_inverse"))
    return index, int(settings["first_rows"])


def attach_stored(model: nn.Module, folder: str | Path) -> CertifiedForward | None:
    """Attach the index stored beside a checkpoint (a local folder, or a hub snapshot through transformers' cache);
    None where it has none."""
    path = _stored_index(str(folder))
    if path is None:
        return None
    index, first_rows = load_index(path)
    return attach(model, index, first_rows)


def _stored_index(folder: str) -> Path | None:
    local = Path(folder) / INDEX_FILE
    if local.is_file():
        return local
    if Path(folder).exists():
        return None
    from transformers.utils import cached_file

    try:  # a hub id: the file from the same snapshot, through transformers' cache (offline: what the cache holds)
        found = cached_file(folder, INDEX_FILE, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # not a repository id (a folder since removed, a malformed name)
        return None
    return Path(found) if found else None


def _value_dtype(model: nn.Module) -> torch.dtype:
    """The centroids' dtype: the model's 16-bit dtype (its hidden states are in it, and the kernel multiplies in it),
    else float32."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
