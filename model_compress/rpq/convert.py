"""Walk a model, choose each layer's RPQ format, fit it on calibration data and swap it in.

Steps, each usable on its own:
  ``find_layers``    every nn.Linear, transformers Conv1D and nn.Embedding, with ties resolved;
  ``plan_layers``    what happens to each one (a format, or left dense and why), before any work;
  ``convert_model``  with a bit budget, measures candidate formats per layer and allocates them
                     (``fit.allocate``); then fits every layer in model order, each block on what
                     the compressed blocks before it produce (``fit.passes``), and swaps it in.
Memory holds one model plus one block's calibration states, never two models.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..core.block_weights import BlockWeights
from ..core.errors import UserError
from .fit.allocate import BudgetError, Option, allocate
from .fit.calibration import CalibrationSet
from .fit.codebooks import CodebookSet
from .fit.formats import CodeFormat, budget_candidates
from .fit.groups import FitSettings, FittedLayer, fit_cols, fit_rows_group, measure_cols, measure_rows_group, tied_metric
from .fit.passes import Batches, OnOutput, Statistics, run_pass
from .fit.blockwise_sensitivity import blockwise_sensitivities
from .fit.sensitivity import Sensitivity, output_sensitivities
from .fit.stack import find_stack
from .fit.statistics import count_tokens
from .fit.defaults import DEFAULT_BITS, DEFAULT_ROTATION_BLOCK, DEFAULT_ROUNDS, SENSITIVITY_WINDOWS, for_device
from .layers.direct_reads import weights_read_directly
from .layers.modules import KIND_CONV1D, KIND_EMBEDDING, KIND_LINEAR, KIND_TIED_HEAD, RPQEmbedding, build_rpq_module, embedding_needs_dense
from .kernels.layout import EMBEDDING, INT8, LINEAR, MAX_CODEBOOK_SIZE, dtype_name, pack_codes, split_dim
from .resume import ResumeStore, restore_module
from .kernels.rotation import BLOCK_SIZES, HADAMARD, NONE, ROTATIONS, block_for, packed_bytes, random_signs, rotate, rotate_hessian

DEFAULT_CODEBOOK_SIZE = 256  # with --codebooks: rpq-pytorch's K
BITS_RANGE = (1.0, 16.0)  # --bits must lie in (low, high]
# Candidate formats a budget B measures per layer: bits per weight within [B - BELOW, B + ABOVE].
CANDIDATES_BELOW, CANDIDATES_ABOVE = 1.5, 1.5
CALIBRATION_TOKENS_PER_BATCH = 8192  # windows per block call: about this many tokens


@dataclass
class RPQSettings:
    """What the user asked for: a bit budget, or fixed RPQ settings for every layer; what to skip; how to fit.

    ``bits`` (the budget, bits per converted weight, everything stored counted) applies when neither
    ``num_codebooks`` nor ``codebook_size`` is given; those two fix M and K for every layer
    (rpq-pytorch's settings). ``codebook_bits``: 8 (int8 + one scale per codebook) or 16; None lets
    the budget choose per layer, and keeps the model's dtype with fixed settings. ``rotation``: "hadamard"
    or "none"; None rotates with a budget and not with fixed settings (rpq-pytorch's form, which its
    fast kernels read). ``rotation_block``: the Hadamard block wanted (None: the measured default).
    ``any_format``: a budget also offers Linear layers the formats without a fast GPU kernel (3-bit tables, 16-bit
    tables, vectors); by default they are offered only where the budget lies outside the fast formats' costs.
    """

    bits: float | None = None
    num_codebooks: int | None = None
    codebook_size: int | None = None
    codebook_bits: int | None = None
    rotation: str | None = None
    rotation_block: int | None = None
    any_format: bool = False
    skip: list[str] = field(default_factory=list)
    rounds: int | None = None  # None: the device's default (defaults.DEFAULT_ROUNDS)
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def fixed(self) -> bool:
        return self.num_codebooks is not None or self.codebook_size is not None

    @property
    def budget(self) -> float:
        return self.bits if self.bits is not None else DEFAULT_BITS

    @property
    def fit_rounds(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return for_device(DEFAULT_ROUNDS, self.device)

    @property
    def rotation_kind(self) -> str:
        """The rotation in effect: the one asked for, else Hadamard with a budget and none with fixed settings."""
        if self.rotation is not None:
            return self.rotation
        return NONE if self.fixed else HADAMARD

    @property
    def wanted_block(self) -> int:
        return self.rotation_block if self.rotation_block is not None else DEFAULT_ROTATION_BLOCK

    def block_for(self, width: int) -> int | None:
        """The rotation block of a ``width``-wide input under these settings (None: not rotated)."""
        return block_for(width, self.wanted_block) if self.rotation_kind == HADAMARD else None


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


@dataclass
class LayerResult:
    """A converted layer: its plan, ||W - W_hat|| / ||W||, the relative output error on calibration data, rounds, seconds.

    ``output_error`` is tr(dW H dW^T) / tr(W H W^T) (an embedding: the token-weighted error), None
    where the layer saw no calibration inputs.
    """

    plan: LayerPlan
    weight_error: float
    output_error: float | None
    rounds: int
    seconds: float
    loss_weight: float | None = None  # predicted KL (nats per token) of a relative output error of 1 (fit.sensitivity)
    weighted_error: float | None = None  # the output error with its channels weighed by the Fisher diagonal (Linears)

    @property
    def estimated_kl(self) -> float | None:
        """The KL to the original this layer's output error alone predicts (second order, nats per token)."""
        error = self.weighted_error if self.weighted_error is not None else self.output_error
        if self.loss_weight is None or error is None:
            return None
        return self.loss_weight * error


@dataclass
class Allocation:
    """What a budget chose from: every layer's measured candidates (format, bits, error) and the pick."""

    budget: float
    options: dict[str, list[Option]]  # errors already multiplied by the layer's loss weight
    chosen: dict[str, Option]
    weights: int  # how many weights the budget is spread over
    loss_weights: dict[str, float]
    sensitivity: dict[str, dict] = field(default_factory=dict)  # per weighed module: Sensitivity.to_json()

    def usable_bits(self, threshold: float, step: float = 0.25) -> float | None:
        """The smallest budget (in ``step`` increments above this one) whose allocation keeps the mean
        relative output error per layer at or under ``threshold``; None if no measured candidate does."""
        total = self.weights
        lists = list(self.options.values())
        budget = self.budget
        while budget <= self.budget + CANDIDATES_ABOVE:
            budget += step
            try:
                chosen = allocate(lists, budget * total)
            except BudgetError:
                continue
            errors = [o.error / self.loss_weights[name] for name, o in zip(self.options, chosen)]
            if sum(errors) / len(errors) <= threshold:
                return budget
        return None

    def to_json(self) -> dict:
        return {
            "budget_bits": self.budget,
            "objective": "sum over layers of loss weight x relative output error, subject to the stored bits; a loss "
            "weight is the KL to the original (nats per token) that a relative output error of 1 predicts, from the "
            "Fisher information of the model's output in the layer's output (1 where nothing was weighed); a Linear's "
            "errors (candidates' output_error) weigh each output channel by its Fisher diagonal",
            "sensitivity": self.sensitivity,
            "layers": {
                name: {
                    "chosen": self.chosen[name].choice.to_json(),
                    "loss_weight": self.loss_weights[name],
                    "candidates": [
                        {**o.choice.to_json(), "bits": o.bits, "output_error": o.error / self.loss_weights[name]}
                        for o in options
                    ],
                }
                for name, options in self.options.items()
            },
        }


@dataclass
class Conversion:
    """Per layer in model order: a LayerResult (converted) or its LayerPlan (dense); the allocation if any."""

    outcomes: list[LayerPlan | LayerResult]
    allocation: Allocation | None
    calibration: dict | None


class ConversionObserver:
    """Progress callbacks; the CLI draws them with Rich, a library user may ignore them."""

    def started(self, plans: list[LayerPlan]) -> None:
        """Called once, before any work, with every plan (converted and dense)."""

    def measuring(self, done: int, total: int) -> None:
        """Candidate formats measured for ``done`` of ``total`` blocks (budget mode only)."""

    def layer_started(self, plan: LayerPlan) -> None:
        """Called before a layer is fitted."""

    def layer_finished(self, result: LayerResult) -> None:
        """Called after a layer has been fitted and swapped."""


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


def convert_model(
    model: nn.Module,
    settings: RPQSettings,
    calibration: CalibrationSet | None,
    *,
    observer: ConversionObserver | None = None,
    on_output: OnOutput | None = None,
    weights: BlockWeights | None = None,
    store: ResumeStore | None = None,
) -> Conversion:
    """Replace every planned layer of ``model`` (in place) by its RPQ module, fitted on ``calibration``.

    ``calibration`` None fits without data (k-means of the weights: much lower quality).
    ``on_output(held_out, batch, output)`` sees the original model's outputs on the calibration
    windows (the teacher of fine-tuning): called in the measurement pass, or in a pass of its own.
    ``weights``: where the blocks' weights come from (``core.block_weights``; None: the model holds them). A model
    streamed from its checkpoint is read one block at a time where it has a stack of blocks and calibration data,
    and whole otherwise; either way every tensor is in memory when this returns. ``store``: where what is done is
    saved as it is done, and what a stopped run did is taken back from (``rpq.resume``).
    """
    observer = observer or ConversionObserver()
    plans = planned_layers(model, settings)
    observer.started(plans)
    weights = weights or BlockWeights()
    fitter = _ModelFitter(model, plans, settings, calibration, observer, weights, store)
    if fitter.stack is None or calibration is None:
        weights.load_all(model)
    else:
        weights.load_outside(model, fitter.stack.prefix)
    allocation = None
    if calibration is not None:
        fitter.weigh_layers()
    with torch.no_grad():
        if not settings.fixed:
            allocation = fitter.measure_and_allocate(on_output)
        elif on_output is not None and calibration is not None:
            fitter.record_teacher(on_output)
        if store is not None and on_output is not None:
            store.teacher_recorded()
        fitter.restore_finished()
        fitter.fit_all()
    outcomes = [fitter.results.get(plan.layer.name, plan) for plan in plans]
    return Conversion(outcomes, allocation, calibration.to_json() if calibration is not None else None)


class _ModelFitter:
    """The two passes of a conversion over one model: measure (budget only), then fit and swap in order."""

    def __init__(
        self,
        model: nn.Module,
        plans: list[LayerPlan],
        settings: RPQSettings,
        calibration: CalibrationSet | None,
        observer: ConversionObserver,
        weights: BlockWeights,
        store: ResumeStore | None = None,
    ) -> None:
        self.model, self.settings, self.calibration, self.observer = model, settings, calibration, observer
        self.weights, self.store = weights, store
        self.plans = {plan.layer.name: plan for plan in plans if plan.converted}
        dtype = next(iter(self.plans.values())).layer.dtype
        float_name = dtype_name(dtype) if settings.fixed and settings.codebook_bits is None else float_codebook_dtype(dtype)
        self.fit_settings = FitSettings(rounds=settings.fit_rounds, seed=settings.seed, float_dtype=getattr(torch, float_name))
        self.results: dict[str, LayerResult] = {}
        self.sensitivity: dict[str, Sensitivity] = {}
        self.measured: dict[str, list[float]] = {}
        self.candidates: dict[str, list[CodeFormat]] = {}
        self.signs: dict[int, Tensor] = {}
        names = [name for name, plan in self.plans.items() if plan.layer.kind in (KIND_LINEAR, KIND_CONV1D, KIND_TIED_HEAD)]
        self.stack = find_stack(model, names)
        self.linears = {name: model.get_submodule(name) for name in names}
        self.device = settings.device
        input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.token_embedding = next((n for n, m in model.named_modules() if m is input_embeddings), None)

    # -- the passes -------------------------------------------------------------------------------

    def weigh_layers(self) -> None:
        """What each layer's output error costs the model (``fit.sensitivity``), from the original model."""
        saved = self.store.sensitivity() if self.store is not None else None
        if saved is not None:
            self.sensitivity = saved
            return
        modules = {name: self.model.get_submodule(name) for name in self.plans}
        windows = list(self.calibration.fit[: for_device(SENSITIVITY_WINDOWS, self.device)].split(1))
        if self.stack is None:
            self.sensitivity = output_sensitivities(self.model, modules, windows, self.device)
        else:
            self.sensitivity = blockwise_sensitivities(self.model, self.stack, modules, windows, self.device, self.weights)
        if self.store is not None:
            self.store.save_sensitivity(self.sensitivity)

    def measure_and_allocate(self, on_output: OnOutput | None) -> Allocation:
        """Candidates of every layer measured on the original model's states, then one format per layer."""
        saved = self.store.allocation() if self.store is not None else None
        if saved is not None:  # a resumed run: the stopped run's allocation, and the teacher's outputs again
            if on_output is not None and self.calibration is not None:
                self.record_teacher(on_output)
            return self._restore_allocation(saved)
        for name, plan in self.plans.items():
            if plan.layer.kind != KIND_TIED_HEAD:
                self.candidates[name] = _candidates(plan.layer, self.settings, self.fit_settings)
        for name, plan in self.plans.items():
            if plan.layer.kind == KIND_EMBEDDING and not self._tied_head_of(name):
                self.measured[name] = measure_cols(self._weight(name), self.candidates[name], None, self._row_weights(name), self.fit_settings)
        if self.calibration is None:
            for name in self.linears:
                if name not in self.measured and self.plans[name].layer.kind != KIND_TIED_HEAD:
                    self.measured[name] = measure_rows_group([self._weight(name)], [self.candidates[name]], None, self.fit_settings)[0]
        else:
            run_pass(
                self.model, self.stack, self.linears, self._batches(), self.device, self._measure_statistics,
                sequential=False, on_output=on_output, on_block=self.observer.measuring, weights=self.weights,
            )
        for name in self.candidates:  # layers no calibration input reached: their weight error
            if name not in self.measured:
                self.measured[name] = self._measure_without_data(name)
        allocation = self._allocate()
        if self.store is not None:
            self.store.save_allocation(allocation.chosen, allocation.options, {
                "weights": allocation.weights, "loss_weights": allocation.loss_weights, "sensitivity": allocation.sensitivity})
        return allocation

    def record_teacher(self, on_output: OnOutput) -> None:
        """The original model's outputs on the calibration windows, without measuring anything."""
        run_pass(self.model, self.stack, {}, self._batches(), self.device, lambda *args: False, sequential=False,
                 on_output=on_output, weights=self.weights)

    def fit_all(self) -> None:
        """Fit and swap every planned layer, in model order, each block after the compressed ones before it; with a
        store, the layers each block finished are saved when it finishes."""
        for name, plan in self.plans.items():
            if plan.layer.kind == KIND_EMBEDDING and not self._tied_head_of(name) and name not in self.results:
                self._fit_embedding(name, None)
        if self.calibration is not None:
            run_pass(self.model, self.stack, self.linears, self._batches(), self.device, self._fit_statistics, sequential=True,
                     weights=self.weights, on_block=lambda done, total: self._save_finished())
        for name, plan in self.plans.items():  # what no calibration input reached (or no calibration at all)
            if name not in self.results:
                if plan.layer.kind == KIND_TIED_HEAD:
                    self._fit_tied(name, None)
                elif plan.layer.kind in (KIND_LINEAR, KIND_CONV1D):
                    self._fit_linears([name], None)
        self._save_finished()

    def restore_finished(self) -> None:
        """The layers a stopped run finished, swapped in from the store as they were saved (in model order: a tied
        head after its embedding); the passes then record only the others."""
        if self.store is None:
            return
        for name, plan in self.plans.items():
            figures = self.store.finished.get(name)
            if figures is None:
                continue
            tied = self.model.get_submodule(plan.layer.tied_to) if plan.layer.kind == KIND_TIED_HEAD else None
            fmt = plan.format
            module = build_rpq_module(self.model.get_submodule(name), plan.layer.kind, fmt.num_codebooks if tied is None else 0,
                                      fmt.codebook_size if tied is None else 0, tied, fmt.codebook_dtype, plan.rotation_block)
            restore_module(module, self.store.layer_tensors(name))
            self.model.set_submodule(name, module)
            self.linears.pop(name, None)
            result = LayerResult(plan, **{key: value for key, value in figures.items() if key != "file"})
            self.results[name] = result
            self.observer.layer_finished(result)

    def _save_finished(self) -> None:
        """Save the layers finished since the last save (nothing without a store)."""
        if self.store is None:
            return
        new = [name for name in self.results if name not in self.store.finished]
        figures = {name: {"weight_error": r.weight_error, "output_error": r.output_error, "rounds": r.rounds,
                          "seconds": r.seconds, "loss_weight": r.loss_weight, "weighted_error": r.weighted_error}
                   for name, r in ((n, self.results[n]) for n in new)}
        self.store.save_layers({name: self.model.get_submodule(name) for name in new}, figures)

    # -- callbacks of the passes --------------------------------------------------------------------

    def _measure_statistics(self, stage: str, index: int | None, statistics: Statistics) -> bool:
        for group in statistics.groups():
            hessian = self._hessian(group[0], statistics)
            for name in group:
                if self.plans[name].layer.kind == KIND_TIED_HEAD:
                    embedding = self.plans[name].layer.tied_to
                    weight, rows = self._weight(embedding), self._row_weights(embedding)
                    metric = tied_metric(weight, hessian, rows, *self._tie_weights(name))
                    self.measured[embedding] = measure_cols(weight, self.candidates[embedding], metric, rows, self.fit_settings)
            rows = [name for name in group if self.plans[name].layer.kind != KIND_TIED_HEAD]
            if rows:
                errors = measure_rows_group(
                    [self._weight(n) for n in rows], [self.candidates[n] for n in rows], hessian, self.fit_settings,
                    [self._fisher(n) for n in rows],
                )
                self.measured.update(zip(rows, errors))
        return False

    def _fit_statistics(self, stage: str, index: int | None, statistics: Statistics) -> bool:
        for group in statistics.groups():
            hessian = self._hessian(group[0], statistics)
            for name in group:
                if self.plans[name].layer.kind == KIND_TIED_HEAD:
                    self._fit_tied(name, hessian)
            rows = [name for name in group if self.plans[name].layer.kind != KIND_TIED_HEAD]
            if rows:
                self._fit_linears(rows, hessian)
        return True

    # -- fitting and swapping ---------------------------------------------------------------------

    def _fit_linears(self, names: list[str], hessian: Tensor | None) -> None:
        start = time.perf_counter()
        for name in names:
            self.observer.layer_started(self.plans[name])
        fitted = fit_rows_group(
            [self._weight(n) for n in names], [self.plans[n].format for n in names], hessian, self.fit_settings,
            [self._fisher(n) for n in names],
        )
        seconds = (time.perf_counter() - start) / len(names)
        for name, layer in zip(names, fitted):
            self._swap(name, layer, hessian is not None, seconds)

    def _fit_embedding(self, name: str, hessian: Tensor | None) -> None:
        start = time.perf_counter()
        plan = self.plans[name]
        self.observer.layer_started(plan)
        fitted = fit_cols(self._weight(name), plan.format, hessian, self._row_weights(name), self.fit_settings)
        self._swap(name, fitted, True, time.perf_counter() - start)

    def _fit_tied(self, head: str, hessian: Tensor | None) -> None:
        """The table under both its jobs' metric (``fit.groups.tied_metric``), then the head as an RPQTiedHead over its codes."""
        embedding = self.plans[head].layer.tied_to
        metric = None
        if hessian is not None:
            metric = tied_metric(self._weight(embedding), hessian, self._row_weights(embedding), *self._tie_weights(head))
        self._fit_embedding(embedding, metric)
        start = time.perf_counter()
        plan = self.plans[head]
        self.observer.layer_started(plan)
        original = self.model.get_submodule(head)
        replacement = build_rpq_module(original, KIND_TIED_HEAD, 0, 0, self.model.get_submodule(embedding))
        self.model.set_submodule(head, replacement)
        source = self.results[embedding]
        result = LayerResult(plan, source.weight_error, source.output_error, 0, time.perf_counter() - start)  # counted with its table
        self.results[head] = result
        self.observer.layer_finished(result)

    def _swap(self, name: str, fitted: FittedLayer, with_data: bool, seconds: float) -> None:
        plan = self.plans[name]
        signs = self._signs(plan.layer.shape[1]) if plan.rotation_block else None
        replacement = replace_layer(self.model, name, plan.layer.kind, plan.format, fitted, plan.rotation_block, signs)
        if name in self.linears:
            self.linears[name] = replacement
        weight = self._loss_weight(name) if self.sensitivity else None
        result = LayerResult(
            plan, fitted.weight_error, fitted.output_error if with_data else None, fitted.rounds, seconds, weight,
            fitted.weighted_error if with_data else None,
        )
        self.results[name] = result
        self.observer.layer_finished(result)

    # -- helpers ----------------------------------------------------------------------------------

    def _restore_allocation(self, saved: dict) -> Allocation:
        """The formats a stopped run's budget chose, put back in the plans."""
        for name, option in saved["chosen"].items():
            self.plans[name].format = option.choice
            head = self._tied_head_of(name)
            if head:
                self.plans[head].format = option.choice
        return Allocation(self.settings.budget, saved["options"], saved["chosen"], saved["weights"], saved["loss_weights"],
                          saved["sensitivity"])

    def _allocate(self) -> Allocation:
        names = list(self.candidates)
        options = []
        for name in names:
            layer = self.plans[name].layer
            weight = self._loss_weight(name)
            rotation = self.plans[name].rotation_bytes  # the same for every format: counted, it changes no choice
            options.append(
                [
                    Option(fmt, (fmt.stored_bytes(layer.shape, layer.layout) + rotation) * 8.0, error * weight)
                    for fmt, error in zip(self.candidates[name], self.measured[name])
                ]
            )
        total = sum(self.plans[name].layer.numel for name in names)
        try:
            chosen = allocate(options, self.settings.budget * total)
        except BudgetError as error:
            raise UserError(
                f"--bits {self.settings.budget:g} is below what these layers can be stored in "
                f"(at least {error.needed / total:.2f} bits per weight); raise --bits or --skip some layers"
            ) from None
        for name, option in zip(names, chosen):
            self.plans[name].format = option.choice
            head = self._tied_head_of(name)
            if head:
                self.plans[head].format = option.choice
        weights = {name: self._loss_weight(name) for name in names}
        sensitivity = {name: s.to_json() for name, s in self.sensitivity.items()}
        return Allocation(self.settings.budget, dict(zip(names, options)), dict(zip(names, chosen)), total, weights, sensitivity)

    def _loss_weight(self, name: str) -> float:
        """What a unit of ``name``'s relative output error costs the model: the predicted KL (``fit.sensitivity``);
        1 for every layer where nothing was weighed (no calibration, or a model output with neither logits nor states).

        A tied table's measured error is its two jobs' weighted mean, so it costs their sum.
        """
        weights = self._weights()
        known = sorted(weights.values())
        if not known:
            return 2.0 if self._tied_head_of(name) else 1.0
        typical = known[len(known) // 2]
        head = self._tied_head_of(name)
        own = weights.get(name, typical)
        return own + weights.get(head, typical) if head else own

    def _weights(self) -> dict[str, float]:
        """Each weighed module's loss weight: per output channel for a Linear (its measured error is Fisher-weighted,
        ``_fisher``), as if spread like the output for a table (whose error is measured per row)."""
        return {
            name: s.weight if self._weighs_channels(name) else s.isotropic_weight
            for name, s in self.sensitivity.items()
        }

    def _weighs_channels(self, name: str) -> bool:
        plan = self.plans.get(name)
        return plan is not None and plan.layer.kind in (KIND_LINEAR, KIND_CONV1D)

    def _fisher(self, name: str) -> Tensor | None:
        """The Fisher diagonal of the model's output in each of ``name``'s output channels, where it was weighed."""
        sensitivity = self.sensitivity.get(name)
        if sensitivity is None or not self._weighs_channels(name):
            return None
        return sensitivity.fisher.to(self.device)

    def _tie_weights(self, head: str) -> tuple[float, float]:
        """(head, input embedding) weights of a tied table's two jobs; equal where nothing weighed them."""
        embedding = self.plans[head].layer.tied_to
        weights = self._weights()
        if head in weights and embedding in weights:
            return weights[head], weights[embedding]
        return 1.0, 1.0

    def _measure_without_data(self, name: str) -> list[float]:
        plan = self.plans[name]
        if plan.layer.kind == KIND_EMBEDDING:
            return measure_cols(self._weight(name), self.candidates[name], None, self._row_weights(name), self.fit_settings)
        return measure_rows_group([self._weight(name)], [self.candidates[name]], None, self.fit_settings)[0]

    def _weight(self, name: str) -> Tensor:
        """The layer's weight in RPQ terms, float32 on the fitting device: (out, in), or (rows, dim); W R where rotated."""
        module = self.model.get_submodule(name)
        weight = module.weight.t() if self.plans[name].layer.kind == KIND_CONV1D else module.weight
        weight = weight.detach().to(self.device, torch.float32)
        block = self.plans[name].rotation_block
        return weight if block is None else rotate(weight, self._signs(weight.shape[1]), block)

    def _hessian(self, name: str, statistics: Statistics) -> Tensor:
        """The input second moment of ``name``'s group on the fitting device: R^T H R where the group is rotated
        (one rotation per input width, so every member of a group shares it)."""
        hessian = statistics.hessian(name).to(self.device)
        block = self.plans[name].rotation_block
        return hessian if block is None else rotate_hessian(hessian, self._signs(hessian.shape[0]), block)

    def _signs(self, width: int) -> Tensor:
        """The rotation signs of every ``width``-wide input of the model (one draw per width and seed)."""
        if width not in self.signs:
            self.signs[width] = random_signs(width, self.settings.seed).to(self.device)
        return self.signs[width]

    def _row_weights(self, name: str) -> Tensor | None:
        """Token frequencies (+1) for the model's token embedding; None (every row alike) for other tables."""
        if name != self.token_embedding or self.calibration is None:
            return None
        rows = self.plans[name].layer.shape[0]
        return (count_tokens(self.calibration.fit, rows) + 1.0).to(self.device)

    def _tied_head_of(self, embedding: str) -> str | None:
        return next((n for n, p in self.plans.items() if p.layer.kind == KIND_TIED_HEAD and p.layer.tied_to == embedding), None)

    def _batches(self) -> Batches:
        seq_len = self.calibration.seq_len
        size = max(1, CALIBRATION_TOKENS_PER_BATCH // seq_len)
        batches = lambda windows: [b for b in windows.split(size) if b.shape[0]]  # noqa: E731
        return Batches(batches(self.calibration.fit), batches(self.calibration.held_out))


def replace_layer(
    model: nn.Module,
    name: str,
    kind: str,
    fmt: CodeFormat,
    fitted: FittedLayer,
    rotation_block: int | None = None,
    signs: Tensor | None = None,
) -> nn.Module:
    """Swap layer ``name`` of ``model`` for an RPQ module of ``kind`` holding ``fitted``'s codes; returns it.

    ``rotation_block`` and ``signs``: the input rotation the codes were fitted in (None: none).
    """
    original = model.get_submodule(name)
    replacement = build_rpq_module(
        original, kind, fmt.num_codebooks, fmt.codebook_size, codebook_dtype=fmt.codebook_dtype, rotation_block=rotation_block
    )
    fill_codes(replacement, fitted.codes, fitted.codebooks, signs)
    model.set_submodule(name, replacement)
    return replacement


def fill_codes(module: nn.Module, codes: Tensor, codebooks: CodebookSet, signs: Tensor | None = None) -> None:
    """Write fitted codes (packed), codebooks (as the module stores them) and rotation signs into an empty RPQ module."""
    with torch.no_grad():
        if module.rotation_signs is not None:
            module.set_signs(signs)
        if module.codebook_scales is not None:
            levels, scales = codebooks.int8_parts()
            module.codebooks.copy_(levels)
            module.codebook_scales.copy_(scales)
        else:
            module.codebooks.copy_(codebooks.values.to(module.codebooks.dtype))
        module.indices.copy_(pack_codes(codes, module.code_bits))


def _candidates(layer: LayerInfo, settings: RPQSettings, fit_settings: FitSettings) -> list[CodeFormat]:
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
    """Formats around the budget, or around the dearest format under it (see ``_candidates``)."""
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


def validate_settings(settings: RPQSettings) -> None:
    """The checks that need no model, so a caller can fail before the (slow) load."""
    if settings.bits is not None and settings.fixed:
        raise UserError("give either --bits (a budget) or --codebooks / --codebook-size (fixed settings), not both")
    if settings.bits is not None and not BITS_RANGE[0] < settings.bits <= BITS_RANGE[1]:
        raise UserError(f"--bits must be above {BITS_RANGE[0]:g} and at most {BITS_RANGE[1]:g}, got {settings.bits:g}")
    if settings.num_codebooks is not None and settings.num_codebooks < 1:
        raise UserError(f"--codebooks must be a positive integer, got {settings.num_codebooks}")
    if settings.codebook_size is not None and not 2 <= settings.codebook_size <= MAX_CODEBOOK_SIZE:
        raise UserError(f"--codebook-size must be between 2 and {MAX_CODEBOOK_SIZE}, got {settings.codebook_size}")
    if settings.codebook_bits not in (None, 8, 16):
        raise UserError(f"--codebook-bits must be 8 or 16, got {settings.codebook_bits}")
    if settings.rounds is not None and settings.rounds < 1:
        raise UserError(f"--rounds must be a positive integer, got {settings.rounds}")
    if settings.rotation is not None and settings.rotation not in ROTATIONS:
        raise UserError(f"--rotation must be one of {', '.join(ROTATIONS)}, got {settings.rotation!r}")
    if settings.rotation_block is not None and settings.rotation_block not in BLOCK_SIZES:
        raise UserError(f"--rotation-block must be one of {', '.join(map(str, BLOCK_SIZES))}, got {settings.rotation_block}")


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

