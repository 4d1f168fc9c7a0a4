"""Walk a model, fit RPQ codebooks layer by layer, and swap each layer for its RPQ module.

Three steps, each usable on its own:
  ``find_layers``   every nn.Linear, transformers Conv1D and nn.Embedding, with ties resolved;
  ``plan_layers``   what happens to each one (codebooks, or left dense and why), before any work;
  ``convert_model`` fits and swaps, one layer at a time: the dense weight goes to the fitting
                    device, its codes come back, and the dense module is dropped, so memory holds
                    one model plus one layer, never two models.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import UserError
from .kmeans import kmeans
from .layers import KIND_CONV1D, KIND_EMBEDDING, KIND_LINEAR, KIND_TIED_HEAD, RPQEmbedding, build_rpq_module
from .layout import EMBEDDING, LINEAR, column_count, decode, index_dtype, split_dim, to_pieces


@dataclass
class RPQSettings:
    """What the user asked for: the RPQ knob M, codebook size K, what to leave dense, how to fit."""

    num_codebooks: int = 32
    codebook_size: int = 256
    skip: list[str] = field(default_factory=list)
    max_iter: int = 25
    tol: float = 1e-4
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class LayerInfo:
    """A supported layer found in the model. ``shape`` is in RPQ terms: (out, in) or (rows, dim)."""

    name: str
    kind: str
    shape: tuple[int, int]
    dtype: torch.dtype
    tied_to: str | None = None  # for a tied head: the embedding it shares its weight with

    @property
    def layout(self) -> str:
        return EMBEDDING if self.kind in (KIND_EMBEDDING, KIND_TIED_HEAD) else LINEAR

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def dense_bytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass
class LayerPlan:
    """The decision for one layer: ``num_codebooks`` (M actually used) or the reason it stays dense."""

    layer: LayerInfo
    num_codebooks: int | None
    codebook_size: int
    dense_reason: str | None = None

    @property
    def converted(self) -> bool:
        return self.dense_reason is None

    @property
    def code_bytes(self) -> int:
        if self.layer.kind == KIND_TIED_HEAD:
            return 0
        columns = column_count(self.layer.shape, self.layer.layout)
        return self.num_codebooks * columns * _itemsize(index_dtype(self.codebook_size))

    @property
    def codebook_bytes(self) -> int:
        if self.layer.kind == KIND_TIED_HEAD:
            return 0
        return self.codebook_size * split_dim(self.layer.shape, self.layer.layout) * _itemsize(self.layer.dtype)


@dataclass
class LayerResult:
    """A converted layer: its plan, the fit's relative error ||W - W_hat|| / ||W||, iterations, seconds."""

    plan: LayerPlan
    rel_error: float
    iterations: int
    seconds: float


class ConversionObserver:
    """Progress callbacks; the CLI draws them with Rich, a library user may ignore them."""

    def started(self, plans: list[LayerPlan]) -> None:
        """Called once, before the first layer, with every plan (converted and dense)."""

    def layer_started(self, plan: LayerPlan) -> None:
        """Called before a layer is fitted."""

    def layer_finished(self, result: LayerResult) -> None:
        """Called after a layer has been fitted and swapped."""


# Per-column weights for the fit (data-aware RPQ): given a layer's name, a tensor (columns,) or None.
ColumnImportance = Callable[[str], Tensor | None]


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every layer RPQ can replace, embeddings first so that the heads tied to them come after.

    Linear layers owned by nn.MultiheadAttention are left out: its forward reads ``out_proj.weight``
    directly instead of calling the module.
    """
    embeddings: dict[int, str] = {}
    found: list[LayerInfo] = []
    inside_attention = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and not isinstance(module, RPQEmbedding):
            embeddings[id(module.weight)] = name
            found.append(LayerInfo(name, KIND_EMBEDDING, tuple(module.weight.shape), module.weight.dtype))
    for name, module in model.named_modules():
        if name in inside_attention:
            continue
        if isinstance(module, nn.Linear):
            tied = embeddings.get(id(module.weight))
            kind = KIND_TIED_HEAD if tied else KIND_LINEAR
            found.append(LayerInfo(name, kind, tuple(module.weight.shape), module.weight.dtype, tied))
        elif isinstance(module, Conv1D):
            found.append(LayerInfo(name, KIND_CONV1D, (module.nf, module.nx), module.weight.dtype))
    return found


def nearest_divisor(dim: int, wanted: int) -> int:
    """The divisor of ``dim`` closest to ``wanted``; ties go to the smaller (fewer code bits)."""
    return min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: (abs(d - wanted), d))


def plan_layers(layers: list[LayerInfo], settings: RPQSettings) -> list[LayerPlan]:
    """Decide, for every layer, M and K or why it stays dense. Raises UserError on settings that cannot work."""
    _check_settings(layers, settings)
    skipped = {layer.name for layer in layers if _matches_skip(layer.name, settings.skip)}
    plans: dict[str, LayerPlan] = {}
    for layer in layers:
        if layer.kind == KIND_TIED_HEAD:
            continue
        num_codebooks = nearest_divisor(split_dim(layer.shape, layer.layout), settings.num_codebooks)
        plan = LayerPlan(layer, num_codebooks, settings.codebook_size)
        if layer.name in skipped:
            plan.dense_reason = "--skip"
        elif plan.code_bytes + plan.codebook_bytes >= layer.dense_bytes:
            plan.dense_reason = "would not get smaller"
        plans[layer.name] = plan
    for layer in layers:
        if layer.kind != KIND_TIED_HEAD:
            continue
        # One set of codes serves both ends of a tie, so the two are converted together or not at all.
        source = plans[layer.tied_to]
        plan = LayerPlan(layer, source.num_codebooks, settings.codebook_size)
        if layer.name in skipped and source.converted:
            source.dense_reason = f"--skip on its tied head {layer.name}"
        if not source.converted:
            plan.dense_reason = f"tied to {layer.tied_to}, which stays dense"
        plans[layer.name] = plan
    return [plans[layer.name] for layer in layers]


def convert_model(
    model: nn.Module,
    settings: RPQSettings,
    *,
    observer: ConversionObserver | None = None,
    importance: ColumnImportance | None = None,
) -> list[LayerPlan | LayerResult]:
    """Replace every planned layer of ``model`` (in place) by its RPQ module.

    Returns, in model order, a LayerResult for each converted layer and the LayerPlan of each one
    left dense. ``importance`` is the hook for data-aware fitting: per-column weights of the
    k-means objective (None weighs every column equally).
    """
    observer = observer or ConversionObserver()
    layers = find_layers(model)
    if not layers:
        raise UserError("the model has no supported layers (nn.Linear, nn.Embedding, transformers Conv1D)")
    plans = plan_layers(layers, settings)
    if not any(plan.converted for plan in plans):
        raise UserError(
            "nothing to convert: every supported layer is skipped or would not get smaller "
            f"(with --codebook-size {settings.codebook_size}, a layer needs more than that many input columns)"
        )
    observer.started(plans)
    outcomes: list[LayerPlan | LayerResult] = []
    errors: dict[str, float] = {}
    with torch.no_grad():
        for plan in plans:
            if not plan.converted:
                outcomes.append(plan)
                continue
            observer.layer_started(plan)
            if plan.layer.kind == KIND_TIED_HEAD:
                result = _tie_head(model, plan, errors[plan.layer.tied_to])
            else:
                result = _convert_layer(model, plan, settings, importance)
            errors[plan.layer.name] = result.rel_error
            observer.layer_finished(result)
            outcomes.append(result)
    return outcomes


def fit_weight(
    weight: Tensor,
    layout: str,
    num_codebooks: int,
    codebook_size: int,
    *,
    settings: RPQSettings,
    sample_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, int]:
    """k-means fit of one dense weight: (codebooks in the weight's dtype, indices, relative error, iterations).

    The error is measured on the codebooks as stored (after the cast to the weight's dtype).
    """
    dense = weight.detach().to(settings.device, torch.float32)
    pieces = to_pieces(dense, num_codebooks, layout)
    fit = kmeans(
        pieces,
        codebook_size,
        sample_weight=sample_weight,
        max_iter=settings.max_iter,
        tol=settings.tol,
        seed=settings.seed,
    )
    codebooks = fit.centroids.to(weight.dtype)
    indices = fit.codes.to(index_dtype(codebook_size))
    rebuilt = decode(codebooks.float(), indices, layout)
    rel_error = (torch.linalg.vector_norm(dense - rebuilt) / torch.linalg.vector_norm(dense).clamp_min(1e-30)).item()
    return codebooks, indices, rel_error, fit.iterations


def _convert_layer(
    model: nn.Module, plan: LayerPlan, settings: RPQSettings, importance: ColumnImportance | None
) -> LayerResult:
    """Fit one layer and swap it in; the dense module is dropped as soon as its codes exist."""
    start = time.perf_counter()
    layer = plan.layer
    original = model.get_submodule(layer.name)
    weight = original.weight.t() if layer.kind == KIND_CONV1D else original.weight
    sample_weight = importance(layer.name) if importance else None
    codebooks, indices, rel_error, iterations = fit_weight(
        weight, layer.layout, plan.num_codebooks, plan.codebook_size, settings=settings, sample_weight=sample_weight
    )
    replacement = build_rpq_module(original, layer.kind, plan.num_codebooks, plan.codebook_size)
    replacement.codebooks.copy_(codebooks)
    replacement.indices.copy_(indices)
    model.set_submodule(layer.name, replacement)
    del original, weight
    return LayerResult(plan, rel_error, iterations, time.perf_counter() - start)


def _tie_head(model: nn.Module, plan: LayerPlan, embedding_error: float) -> LayerResult:
    """Swap a head tied to a converted embedding for an RPQTiedHead over the same codes.

    Its error is the embedding's (the same codes), recorded again for the per-type summary.
    """
    start = time.perf_counter()
    original = model.get_submodule(plan.layer.name)
    embedding = model.get_submodule(plan.layer.tied_to)
    replacement = build_rpq_module(original, KIND_TIED_HEAD, plan.num_codebooks, plan.codebook_size, embedding)
    model.set_submodule(plan.layer.name, replacement)
    return LayerResult(plan, embedding_error, 0, time.perf_counter() - start)


def validate_settings(settings: RPQSettings) -> None:
    """The checks that need no model, so a caller can fail before the (slow) load."""
    if settings.num_codebooks < 1:
        raise UserError(f"--codebooks must be a positive integer, got {settings.num_codebooks}")
    if not 2 <= settings.codebook_size <= 65536:
        raise UserError(f"--codebook-size must be between 2 and 65536, got {settings.codebook_size}")
    if settings.max_iter < 1:
        raise UserError(f"--iters must be a positive integer, got {settings.max_iter}")


def _check_settings(layers: list[LayerInfo], settings: RPQSettings) -> None:
    validate_settings(settings)
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
