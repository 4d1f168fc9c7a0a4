"""The per-layer steps of a conversion, which know nothing of the loop over blocks that calls them (``convert``).

Weighing every layer (its Fisher weight), measuring candidate formats on a layer's calibration statistics,
allocating formats to the budget, fitting a layer (or the layers that share an input) and swapping its RPQ module
in, putting back what a stopped run finished and saving what this one finishes. ``measure_statistics`` and
``fit_statistics`` are the callbacks the passes hand each block's statistics to.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.block_weights import BlockWeights
from ..core.workers import Workers
from ..core.errors import UserError
from .fit.allocate import BudgetError, Option, allocate
from .fit.blockwise_sensitivity import blockwise_sensitivities
from .fit.calibration import CalibrationSet
from .fit.codebooks import CodebookSet
from .fit.defaults import SENSITIVITY_WINDOWS, for_device
from .fit.formats import CodeFormat
from .fit.groups import FitSettings, FittedLayer, fit_cols, fit_rows_group, measure_cols, measure_rows_group, tied_metric
from .fit.passes import Batches, Statistics
from .fit.sensitivity import Sensitivity, output_sensitivities
from .fit.spread import Job, Spread, summed
from .fit.stack import find_stack
from .fit.statistics import count_tokens
from .kernels.layout import dtype_name, pack_codes
from .kernels.rotation import random_signs, rotate, rotate_hessian
from .layers.modules import KIND_CONV1D, KIND_EMBEDDING, KIND_LINEAR, KIND_TIED_HEAD, build_rpq_module
from .outcomes import Allocation, ConversionObserver, LayerResult
from .plan import LayerPlan, candidates, float_codebook_dtype
from .resume import ResumeStore, restore_module
from .settings import RPQSettings

CALIBRATION_TOKENS_PER_BATCH = 8192  # windows per block call: about this many tokens


class LayerSteps:
    """The steps of one model's conversion, layer by layer: what the loop in ``convert.convert_model`` calls."""

    def __init__(
        self,
        model: nn.Module,
        plans: list[LayerPlan],
        settings: RPQSettings,
        calibration: CalibrationSet | None,
        observer: ConversionObserver,
        weights: BlockWeights,
        store: ResumeStore | None = None,
        workers: Workers | None = None,
    ) -> None:
        self.model, self.settings, self.calibration, self.observer = model, settings, calibration, observer
        self.weights, self.store = weights, store
        self.workers = workers or Workers()
        self.spread = Spread(self.workers)  # every measurement and fit by one process, its result handed to all
        if calibration is not None and self.workers.spread:
            batches = -(-calibration.fit.shape[0] // windows_per_batch(calibration.seq_len))
            if batches < self.workers.world:  # a process without a batch would miss the layers' statistics
                raise UserError(f"the calibration windows make {batches} batch(es), fewer than the {self.workers.world} "
                                "processes: use fewer processes, or more --calib-tokens")
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

    # -- weighing and measuring -------------------------------------------------------------------

    def weigh_layers(self) -> None:
        """What each layer's output error costs the model (``fit.sensitivity``), from the original model."""
        saved = self.store.sensitivity() if self.store is not None else None
        if saved is not None:
            self.sensitivity = saved
            return
        modules = {name: self.model.get_submodule(name) for name in self.plans}
        windows = list(self.calibration.fit[: for_device(SENSITIVITY_WINDOWS, self.device)].split(1))
        if self.stack is None:
            self.sensitivity = self.spread.run(lambda: output_sensitivities(self.model, modules, windows, self.device))
        else:
            self.sensitivity = self.spread.run(
                lambda: blockwise_sensitivities(self.model, self.stack, modules, windows, self.device, self.weights))
        if self.store is not None:
            self.store.save_sensitivity(self.sensitivity)

    def saved_allocation(self) -> Allocation | None:
        """A resumed run: the stopped run's allocation, its formats put back in the plans; None otherwise."""
        saved = self.store.allocation() if self.store is not None else None
        return None if saved is None else self._restore_allocation(saved)

    def measure_outside_passes(self) -> None:
        """Every layer's candidate formats; measured here where no pass is needed (embeddings without a tied head,
        and every layer when there is no calibration data)."""
        for name, plan in self.plans.items():
            if plan.layer.kind != KIND_TIED_HEAD:
                self.candidates[name] = candidates(plan.layer, self.settings, self.fit_settings)
        names = [name for name, plan in self.plans.items() if plan.layer.kind == KIND_EMBEDDING and not self._tied_head_of(name)]
        if self.calibration is None:
            names += [name for name in self.linears if self.plans[name].layer.kind != KIND_TIED_HEAD]
        self._measure_without_data(names)

    def measure_unreached(self, block: int) -> None:
        """After block ``block`` ran in the measuring pass, while its weights are at hand: its layers that no
        calibration input reached (a decoder's cross-attention run without an encoder), by their weight error."""
        if self.stack is not None:
            self._measure_without_data([name for name in self.candidates
                                        if name not in self.measured and self.stack.index_of(name) == block])

    def allocate(self) -> Allocation:
        """One format per layer for the budget, from every measured candidate (the weight error of layers no
        calibration input reached); saved for a resumed run."""
        self._measure_without_data([name for name in self.candidates if name not in self.measured])
        allocation = self._allocate()
        if self.store is not None:
            self.store.save_allocation(allocation.chosen, allocation.options, {
                "weights": allocation.weights, "loss_weights": allocation.loss_weights, "sensitivity": allocation.sensitivity})
        return allocation

    # -- fitting ----------------------------------------------------------------------------------

    def fit_embeddings(self) -> None:
        """Tables without a tied head, before the blocks (their statistics are token counts, not a pass's)."""
        self.spread.run_all([self._embedding_job(name, None) for name, plan in self.plans.items()
                             if plan.layer.kind == KIND_EMBEDDING and not self._tied_head_of(name) and name not in self.results])

    def fit_the_rest(self) -> None:
        """What no calibration input reached (or every layer, without calibration), fitted on its weights alone."""
        jobs: list[Job] = []
        for name, plan in self.plans.items():
            if name not in self.results:
                if plan.layer.kind == KIND_TIED_HEAD:
                    jobs.append(self._tied_job(name, None))
                elif plan.layer.kind in (KIND_LINEAR, KIND_CONV1D):
                    jobs.append(self._linears_job([name], None))
        self.spread.run_all(jobs)

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

    def save_finished(self) -> None:
        """Save the layers finished since the last save (nothing without a store)."""
        if self.store is None:
            return
        new = [name for name in self.results if name not in self.store.finished]
        figures = {name: {"weight_error": r.weight_error, "output_error": r.output_error, "rounds": r.rounds,
                          "seconds": r.seconds, "loss_weight": r.loss_weight, "weighted_error": r.weighted_error}
                   for name, r in ((n, self.results[n]) for n in new)}
        self.store.save_layers({name: self.model.get_submodule(name) for name in new}, figures)

    # -- callbacks of the passes --------------------------------------------------------------------

    def measure_statistics(self, stage: str, index: int | None, statistics: Statistics) -> bool:
        statistics = summed(statistics, self.workers)
        jobs = []
        for group in statistics.groups():
            hessian = self._hessian(group[0], statistics)
            jobs.append((lambda group=group, hessian=hessian: self._measure_group(group, hessian), self.measured.update))
        self.spread.run_all(jobs)
        return False

    def _measure_group(self, group: list[str], hessian: Tensor) -> dict[str, list[float]]:
        """The candidates' errors of the layers of one shared input (a tied head's: its table's, under both metrics)."""
        measured = {}
        for name in group:
            if self.plans[name].layer.kind == KIND_TIED_HEAD:
                embedding = self.plans[name].layer.tied_to
                weight, rows = self._weight(embedding), self._row_weights(embedding)
                metric = tied_metric(weight, hessian, rows, *self._tie_weights(name))
                measured[embedding] = measure_cols(weight, self.candidates[embedding], metric, rows, self.fit_settings)
        rows = [name for name in group if self.plans[name].layer.kind != KIND_TIED_HEAD]
        if rows:
            errors = measure_rows_group(
                [self._weight(n) for n in rows], [self.candidates[n] for n in rows], hessian, self.fit_settings,
                [self._fisher(n) for n in rows],
            )
            measured.update(zip(rows, errors))
        return measured

    def fit_statistics(self, stage: str, index: int | None, statistics: Statistics) -> bool:
        statistics = summed(statistics, self.workers)
        jobs: list[Job] = []
        for group in statistics.groups():  # independent fits: spread, each process fitting its groups at once
            hessian = self._hessian(group[0], statistics)
            jobs += [self._tied_job(name, hessian) for name in group if self.plans[name].layer.kind == KIND_TIED_HEAD]
            rows = [name for name in group if self.plans[name].layer.kind != KIND_TIED_HEAD]
            if rows:
                jobs.append(self._linears_job(rows, hessian))
        self.spread.run_all(jobs)
        return True

    # -- fitting and swapping ---------------------------------------------------------------------

    def _linears_job(self, names: list[str], hessian: Tensor | None) -> Job:
        """Fitting Linear layers that share ``hessian``, and swapping them in."""

        def fit() -> tuple[list[FittedLayer], float]:
            for name in names:  # said by the process that fits them (spread: the leader says its own)
                self.observer.layer_started(self.plans[name])
            start = time.perf_counter()
            fitted = fit_rows_group(
                [self._weight(n) for n in names], [self.plans[n].format for n in names], hessian, self.fit_settings,
                [self._fisher(n) for n in names],
            )
            return fitted, (time.perf_counter() - start) / len(names)

        def swap(result: tuple[list[FittedLayer], float]) -> None:
            fitted, seconds = result
            for name, layer in zip(names, fitted):
                self._swap(name, layer, hessian is not None, seconds)

        return fit, swap

    def _embedding_job(self, name: str, hessian: Tensor | None, then: Callable[[], None] | None = None) -> Job:
        """Fitting an embedding table (under ``hessian``, its metric), swapping it in, then ``then()``."""
        plan = self.plans[name]

        def fit() -> tuple[FittedLayer, float]:
            self.observer.layer_started(plan)
            start = time.perf_counter()
            fitted = fit_cols(self._weight(name), plan.format, hessian, self._row_weights(name), self.fit_settings)
            return fitted, time.perf_counter() - start

        def swap(result: tuple[FittedLayer, float]) -> None:
            self._swap(name, result[0], True, result[1])
            if then is not None:
                then()

        return fit, swap

    def _tied_job(self, head: str, hessian: Tensor | None) -> Job:
        """The table under both its jobs' metric (``fit.groups.tied_metric``), then the head as an RPQTiedHead over its codes."""
        embedding = self.plans[head].layer.tied_to
        metric = None
        if hessian is not None:
            metric = tied_metric(self._weight(embedding), hessian, self._row_weights(embedding), *self._tie_weights(head))
        return self._embedding_job(embedding, metric, then=lambda: self._tie_head(head, embedding))

    def _tie_head(self, head: str, embedding: str) -> None:
        """The head as an RPQTiedHead over its fitted table's codes."""
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

    def _measure_without_data(self, names: list[str]) -> None:
        """The candidates' errors of ``names`` by their weights alone, into ``measured``: independent jobs, spread."""
        self.spread.run_all([(lambda name=name: self._weight_errors(name),
                              lambda errors, name=name: self.measured.__setitem__(name, errors)) for name in names])

    def _weight_errors(self, name: str) -> list[float]:
        if self.plans[name].layer.kind == KIND_EMBEDDING:
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

    def batches(self) -> Batches:
        size = windows_per_batch(self.calibration.seq_len)
        batches = lambda windows: [b for b in windows.split(size) if b.shape[0]]  # noqa: E731
        # spread over processes: each runs its share of the fit batches (whole batches: each computed as alone) and
        # every held-out one (fine-tuning judges each process's model on all of them)
        return Batches(self.workers.share(batches(self.calibration.fit)), batches(self.calibration.held_out))


def windows_per_batch(seq_len: int) -> int:
    """Calibration windows run through a block together: about ``CALIBRATION_TOKENS_PER_BATCH`` tokens."""
    return max(1, CALIBRATION_TOKENS_PER_BATCH // seq_len)


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

