"""Which layers a conversion replaces and how: every supported layer found, each one's plan (a format, or why it
stays dense), and the candidate formats a budget measures for it. Nothing here reads a weight: it runs on a model
built empty, before the weights load.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import UserError
from .fit.formats import CodeFormat, budget_candidates
from .fit.groups import FitSettings
from .kernels.layout import EMBEDDING, INT8, LINEAR, dtype_name, split_dim
from .kernels.rotation import packed_bytes
from .layers.direct_reads import weights_read_directly
from .layers.modules import KIND_CONV1D, KIND_EMBEDDING, KIND_LINEAR, KIND_TIED_HEAD, RPQEmbedding, embedding_needs_dense
from .settings import DEFAULT_CODEBOOK_SIZE, RPQSettings, validate_settings

# Candidate formats a budget B measures per layer: bits per weight within [B - BELOW, B + ABOVE].
CANDIDATES_BELOW, CANDIDATES_ABOVE = 1.5, 1.5


@dataclass
class LayerInfo:
    """A supported layer found in the model. ``shape`` is in RPQ terms: (out, in) or (rows, dim)."""

    name: str
    kind: str
    shape: tuple[int, int]
    dtype: torch.dtype
    tied_to: str | None = None  # for a tied head: the embedding it shares its weight with
    keep_dense: str | None = None  # why the model's own code needs this layer dense, when it does

    @property
    def layout(self) -> str:
        return EMBEDDING if self.kind in (KIND_EMBEDDING, KIND_TIED_HEAD) else LINEAR

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def dense_bytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class LayerPlan:
    """The decision for one layer: its ``format`` or the reason it stays dense."""

    layer: LayerInfo
    format: CodeFormat | None = None
    dense_reason: str | None = None
    rotation_block: int | None = None  # the Hadamard block of its input rotation (a tied head: its embedding's)

    @property
    def converted(self) -> bool:
        return self.dense_reason is None

    @property
    def num_codebooks(self) -> int | None:
        return self.format.num_codebooks if self.format else None

    @property
    def codebook_size(self) -> int | None:
        return self.format.codebook_size if self.format else None

    @property
    def codebook_dtype(self) -> str | None:
        return self.format.codebook_dtype if self.format else None

    @property
    def code_bytes(self) -> int:
        if self.layer.kind == KIND_TIED_HEAD or self.format is None:
            return 0
        return self.format.code_bytes(self.layer.shape, self.layer.layout)

    @property
    def codebook_bytes(self) -> int:
        """What the layer stores beside its codes: codebooks, their scales, its rotation's sign bits."""
        if self.layer.kind == KIND_TIED_HEAD or self.format is None:
            return 0
        return self.format.codebook_bytes(self.layer.shape, self.layer.layout) + self.rotation_bytes

    @property
    def rotation_bytes(self) -> int:
        if self.layer.kind == KIND_TIED_HEAD or self.rotation_block is None:
            return 0
        return packed_bytes(self.layer.shape[1])



def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every layer RPQ can replace, embeddings first so that the heads tied to them come after.

    A layer whose ``.weight`` the model's own code reads (``direct_reads``) or whose embedding subclass
    reads its own ``.weight`` without a stand-in is listed with ``keep_dense`` saying why.
    """
    embeddings: dict[int, str] = {}
    found: list[LayerInfo] = []
    read_directly = weights_read_directly(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and not isinstance(module, RPQEmbedding):
            embeddings[id(module.weight)] = name
            reason = read_directly.get(name)
            if reason is None and embedding_needs_dense(module):
                reason = f"{type(module).__name__}.forward reads .weight itself"
            found.append(LayerInfo(name, KIND_EMBEDDING, tuple(module.weight.shape), module.weight.dtype, keep_dense=reason))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            tied = embeddings.get(id(module.weight))
            kind = KIND_TIED_HEAD if tied else KIND_LINEAR
            found.append(LayerInfo(name, kind, tuple(module.weight.shape), module.weight.dtype, tied, read_directly.get(name)))
        elif isinstance(module, Conv1D):
            found.append(LayerInfo(name, KIND_CONV1D, (module.nf, module.nx), module.weight.dtype, keep_dense=read_directly.get(name)))
    return found


def nearest_divisor(dim: int, wanted: int) -> int:
    """The divisor of ``dim`` closest to ``wanted``; ties go to the smaller (fewer code bits)."""
    return min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: (abs(d - wanted), d))


def float_codebook_dtype(model_dtype: torch.dtype) -> str:
    """The 16-bit float a budget's codebooks use: the model's own when it is 16-bit, else float16."""
    return dtype_name(model_dtype) if model_dtype in (torch.float16, torch.bfloat16) else "float16"


def plan_layers(layers: list[LayerInfo], settings: RPQSettings) -> list[LayerPlan]:
    """Decide, for every layer, its fixed format (or, with a budget, that it is converted) or why it stays dense.

    Raises UserError on settings that cannot work. With a budget, ``format`` stays None until
    ``convert_model`` has measured and allocated.
    """
    _check_settings(layers, settings)
    skipped = {layer.name for layer in layers if _matches_skip(layer.name, settings.skip)}
    plans: dict[str, LayerPlan] = {}
    for layer in layers:
        if layer.kind == KIND_TIED_HEAD:
            continue
        plan = LayerPlan(layer, rotation_block=settings.block_for(layer.shape[1]))  # the input's width, or a table's
        smallest = _fixed_format(layer, settings) if settings.fixed else _cheapest_candidate(layer, settings)
        if settings.fixed:
            plan.format = smallest
        if layer.name in skipped:
            plan.dense_reason = "--skip"
        elif layer.keep_dense:
            plan.dense_reason = layer.keep_dense
        elif smallest is None or smallest.stored_bytes(layer.shape, layer.layout) >= layer.dense_bytes:
            plan.dense_reason = "would not get smaller"
        plans[layer.name] = plan
    for layer in layers:
        if layer.kind != KIND_TIED_HEAD:
            continue
        # One set of codes serves both ends of a tie, so the two are converted together or not at all.
        source = plans[layer.tied_to]
        plan = LayerPlan(layer, source.format, rotation_block=source.rotation_block)
        if layer.name in skipped and source.converted:
            source.dense_reason = f"--skip on its tied head {layer.name}"
        if not source.converted:
            plan.dense_reason = f"tied to {layer.tied_to}, which stays dense"
        plans[layer.name] = plan
    return [plans[layer.name] for layer in layers]


def refuse_unsupported(model: nn.Module) -> None:
    """One line, before any fitting, for a kind of model the conversion cannot yet make correctly.

    Encoder-decoder models (T5): their feed-forward code reads ``wo.weight`` of a Linear the conversion
    replaces, and the calibration passes run one stack of blocks, not an encoder and a decoder.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"model type {getattr(config, 'model_type', type(model).__name__)}: encoder-decoder models are not supported "
            "(their code reads Linear weights directly and calibration runs one stack of blocks); "
            "compress a decoder-only or encoder-only model"
        )


def planned_layers(model: nn.Module, settings: RPQSettings) -> list[LayerPlan]:
    """``plan_layers`` of the model's layers; a UserError when there is nothing to convert (checked before calibration)."""
    refuse_unsupported(model)
    layers = find_layers(model)
    if not layers:
        raise UserError("the model has no supported layers (nn.Linear, nn.Embedding, transformers Conv1D)")
    plans = plan_layers(layers, settings)
    if not any(plan.converted for plan in plans):
        raise UserError("nothing to convert: every supported layer is skipped or would not get smaller")
    return plans



def candidates(layer: LayerInfo, settings: RPQSettings, fit_settings: FitSettings) -> list[CodeFormat]:
    """The formats a budget measures for one layer: those near the budget, or near the dearest format under
    it where the budget is above every format this layer has (--bits 16 on a narrow layer), with the cheapest
    of all added where none near the budget is under it. A Linear gets only formats with a fast GPU kernel
    (``byte_permute_format``) where the budget lies between their costs, unless ``settings.any_format``."""
    dtypes = _codebook_dtypes(settings, fit_settings)
    budget = settings.budget
    fast_only = not settings.any_format and layer.layout == LINEAR
    found = _candidates_near_budget(layer, dtypes, budget, fast_only)
    if fast_only:
        costs = [c.bits_per_weight(layer.shape, layer.layout) for c in found]
        if not costs or min(costs) > budget or max(costs) < budget:  # a budget outside the fast formats: every format
            found = _candidates_near_budget(layer, dtypes, budget, False)
    if not any(c.bits_per_weight(layer.shape, layer.layout) <= budget for c in found):
        cheapest = _cheapest_candidate(layer, settings, fit_settings)
        if cheapest is not None:
            found.insert(0, cheapest)
    return found


def _candidates_near_budget(layer: LayerInfo, dtypes: tuple[str, ...], budget: float, fast_only: bool) -> list[CodeFormat]:
    """Formats around the budget, or around the dearest format under it (see ``candidates``)."""
    scale = _scale_bytes(layer)
    under = [c.bits_per_weight(layer.shape, layer.layout)
             for c in budget_candidates(layer.shape, layer.layout, dtypes, 0.0, budget, scale_bytes=scale, fast_only=fast_only)]
    anchor = min(budget, max(under)) if under else budget
    return budget_candidates(layer.shape, layer.layout, dtypes, anchor - CANDIDATES_BELOW, anchor + CANDIDATES_ABOVE, anchor,
                             scale, fast_only)


def _cheapest_candidate(layer: LayerInfo, settings: RPQSettings, fit_settings: FitSettings | None = None) -> CodeFormat | None:
    float_name = dtype_name(fit_settings.float_dtype) if fit_settings else float_codebook_dtype(layer.dtype)
    dtypes = _codebook_dtypes(settings, None, float_name)
    found = budget_candidates(layer.shape, layer.layout, dtypes, 0.0, float("inf"), scale_bytes=_scale_bytes(layer))
    return found[0] if found else None


def _scale_bytes(layer: LayerInfo) -> int:
    """An int8 codebook's scale is stored in the layer's dtype (so the layer computes in it): its size is the cost."""
    return layer.dtype.itemsize


def _codebook_dtypes(settings: RPQSettings, fit_settings: FitSettings | None, float_name: str | None = None) -> tuple[str, ...]:
    float_name = float_name or dtype_name(fit_settings.float_dtype)
    if settings.codebook_bits == 8:
        return (INT8,)
    if settings.codebook_bits == 16:
        return (float_name,)
    return (INT8, float_name)


def _fixed_format(layer: LayerInfo, settings: RPQSettings) -> CodeFormat:
    """``--codebooks`` / ``--codebook-size``: M (the nearest divisor of the split dimension) and K for every layer."""
    wanted = settings.num_codebooks if settings.num_codebooks is not None else FIXED_DEFAULT_CODEBOOKS
    size = settings.codebook_size if settings.codebook_size is not None else DEFAULT_CODEBOOK_SIZE
    dtype = INT8 if settings.codebook_bits == 8 else (
        float_codebook_dtype(layer.dtype) if settings.codebook_bits == 16 else dtype_name(layer.dtype)
    )
    return CodeFormat(nearest_divisor(split_dim(layer.shape, layer.layout), wanted), size, dtype, _scale_bytes(layer))


FIXED_DEFAULT_CODEBOOKS = 32  # M when only --codebook-size is given (rpq-pytorch's example)


def _check_settings(layers: list[LayerInfo], settings: RPQSettings) -> None:
    validate_settings(settings)
    if settings.num_codebooks is not None:
        largest = max(split_dim(layer.shape, layer.layout) for layer in layers)
        if settings.num_codebooks > largest:
            raise UserError(
                f"--codebooks {settings.num_codebooks} is larger than the dimension it splits in every layer "
                f"(largest: {largest})"
            )
    names = [layer.name for layer in layers]
    for pattern in settings.skip:
        if not any(_matches_skip(name, [pattern]) for name in names):
            raise UserError(f"--skip {pattern!r} matches no supported layer (e.g. {names[0]!r})")


def _matches_skip(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a module's full dotted name (glob), or its last component exactly."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pattern) or pattern == last for pattern in patterns)

