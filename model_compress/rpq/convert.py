"""A conversion as one loop a reader can follow: weigh the layers, measure candidate formats block by block,
allocate them to the budget, then fit block by block, each block on what the compressed blocks before it produce.

Each pass over the blocks is ``fit.passes.run_pass``: a block's weights are read (``core.block_weights``: from
memory, or from the checkpoint when streamed), its inputs run through it, its layers' statistics handed to a step,
and the block let go. The steps themselves (``layer_steps``) know nothing of the loop; which layers are converted
and how is decided before any of it, from the model's structure alone (``plan``); what comes out is in
``outcomes``; what a stopped run did comes back from ``resume``.

The names other modules import from here (settings, plans, outcomes) are re-exported: ``convert`` is the entry.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.block_weights import BlockWeights
from ..core.workers import Workers
from .fit.calibration import CalibrationSet
from .fit.passes import OnOutput, run_pass
from .fit.state_placement import StatePlacement
from .layer_steps import LayerSteps, fill_codes, replace_layer
from .outcomes import Allocation, Conversion, ConversionObserver, LayerResult
from .plan import (CANDIDATES_ABOVE, CANDIDATES_BELOW, FIXED_DEFAULT_CODEBOOKS, LayerInfo, LayerPlan, candidates, find_layers,
                   float_codebook_dtype, nearest_divisor, plan_layers, planned_layers, refuse_unsupported)
from .resume import ResumeStore
from .settings import BITS_RANGE, DEFAULT_CODEBOOK_SIZE, RPQSettings, validate_settings

__all__ = [
    "Allocation", "BITS_RANGE", "CANDIDATES_ABOVE", "CANDIDATES_BELOW", "Conversion", "ConversionObserver",
    "DEFAULT_CODEBOOK_SIZE", "FIXED_DEFAULT_CODEBOOKS", "LayerInfo", "LayerPlan", "LayerResult", "RPQSettings", "candidates",
    "convert_model", "fill_codes", "find_layers", "float_codebook_dtype", "nearest_divisor", "plan_layers", "planned_layers",
    "refuse_unsupported", "replace_layer", "validate_settings",
]


def convert_model(
    model: nn.Module,
    settings: RPQSettings,
    calibration: CalibrationSet | None,
    *,
    observer: ConversionObserver | None = None,
    on_output: OnOutput | None = None,
    weights: BlockWeights | None = None,
    store: ResumeStore | None = None,
    workers: Workers | None = None,
) -> Conversion:
    """Replace every planned layer of ``model`` (in place) by its RPQ module, fitted on ``calibration``.

    ``calibration`` None fits without data (k-means of the weights: much lower quality).
    ``on_output(held_out, batch, output)`` sees the original model's outputs on the calibration
    windows (the teacher of fine-tuning): called in the measurement pass, or in a pass of its own.
    ``weights``: where the blocks' weights come from (``core.block_weights``; None: the model holds them). A model
    streamed from its checkpoint is read one block at a time where it has a stack of blocks and calibration data,
    and whole otherwise; either way every tensor is in memory when this returns. ``store``: where what is done is
    saved as it is done, and what a stopped run did is taken back from (``rpq.resume``). ``workers``: the processes
    the conversion is spread over (``core.workers``; each runs this with its own): each runs its share of the fit
    batches (``on_output`` sees those), and every process ends with the same model.
    """
    observer = observer or ConversionObserver()
    plans = planned_layers(model, settings)
    observer.started(plans)
    weights = weights or BlockWeights()
    steps = LayerSteps(model, plans, settings, calibration, observer, weights, store, workers)
    if steps.stack is None or calibration is None:
        weights.load_all(model)
    else:
        weights.load_outside(model, steps.stack.prefix)

    placements: list[StatePlacement] = []

    def placed(placement: StatePlacement) -> None:
        placements.append(placement)
        observer.calibration_states(placement)

    def over_the_blocks(layers: dict, on_statistics, sequential: bool, **kwargs) -> None:
        """One pass: each block read, run on its inputs, its layers' statistics handed on, let go (kept if fitted)."""
        run_pass(model, steps.stack, layers, steps.batches(), settings.device, on_statistics, sequential=sequential,
                 weights=weights, on_placement=placed, **kwargs)

    if calibration is not None:
        steps.weigh_layers()
    allocation = None
    with torch.no_grad():
        teacher_pending = on_output is not None and calibration is not None
        if not settings.fixed:
            allocation = steps.saved_allocation()
            if allocation is None:
                steps.measure_outside_passes()
                if calibration is not None:
                    def measured(done: int, total: int) -> None:
                        steps.measure_unreached(done - 1)
                        observer.measuring(done, total)

                    over_the_blocks(steps.linears, steps.measure_statistics, False, on_output=on_output, on_block=measured)
                    teacher_pending = False
                allocation = steps.allocate()
        if teacher_pending:  # the original's outputs, where no measuring pass recorded them
            over_the_blocks({}, lambda *args: False, False, on_output=on_output)
        if store is not None and on_output is not None:
            store.teacher_recorded()
        steps.restore_finished()
        steps.fit_embeddings()
        if calibration is not None:
            over_the_blocks(steps.linears, steps.fit_statistics, True, on_block=lambda done, total: steps.save_finished())
        steps.fit_the_rest()
        steps.save_finished()
    outcomes = [steps.results.get(plan.layer.name, plan) for plan in plans]
    report = calibration.to_json() if calibration is not None else None
    if report is not None and placements:
        report["states"] = placements[-1].to_json()
    return Conversion(outcomes, allocation, report)
