"""Fitting FFF trees to the blocks they replace, block by block, then optionally the whole model.

Block stage: a tree starts from the block's neurons (``tree_init``), then AdamW trains routers and
leaves on the recorded (input, output) rows to minimise the output MSE (divided by the outputs'
variance, so every layer's loss reads the same). The first part of the steps uses soft routing
with a temperature lowered geometrically from 1 to ``final_temperature``; the rest trains the
leaves under the hard routing they will run with. The error reported is the hard forward's
relative error on held-out rows (the last ``holdout`` share, from other documents).

End-to-end stage (``e2e_steps``): the converted model learns to match the original's output
distribution (KL on logits for LM heads; for bare encoders, which are used through their pooled
sentence embeddings, one minus the cosine of the mean-pooled final hidden states) on the calibration
windows, training only the trees' leaves and shared neurons, under hard routing (``_set_hard`` says why).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.pooling import mean_pooled
from .blocks import DenseWeights
from .capture import BlockRecord, Calibration
from .tree import FastFeedForward, neurons_per_token
from .tree_init import initialise_tree, oracle_error

MAX_DEPTH = 16
MIN_SEQ_LEN = 32
INIT_ROWS = 8192  # calibration rows the initialisation looks at (PCA and router regressions)


SHARED_ALIGN = 16  # the shared part runs as dense GEMMs (cuBLAS): an odd width such as 1170 misaligns their rows


def aligned_width(exact: float, neurons: int) -> int:
    """``exact`` rounded to a multiple of SHARED_ALIGN where that moves the budget by under 1% of the block's
    neurons (a real block), else to the nearest neuron (a tiny one, where 16 neurons are a large share)."""
    aligned = round(exact / SHARED_ALIGN) * SHARED_ALIGN
    return aligned if abs(aligned - exact) <= 0.01 * neurons else round(exact)


@dataclass
class FFFSettings:
    """The user's knobs for `compress fff-distill` (CLI defaults)."""

    depth: int = 3
    neurons_per_token: float | None = None  # share of the neurons a token runs (shared part + one leaf); None: 1/2**depth, no shared part
    leaf_width: int | None = None  # None: the neurons left after the shared part / 2**depth (every neuron kept)
    leaves_per_token: int = 1  # k > 1: the route's leaf and the k - 1 that overrule the routers least, outputs added
    refit: bool = True  # each leaf's output rows refitted in closed form on its tokens (off: exact copies)
    allocate: bool = False  # with neurons_per_token: shares per block from the model's loss, at that mean (measured: no gain)
    layers: str | None = None  # None: every FF block
    steps: int = 400
    batch_tokens: int = 1024
    lr: float = 1e-3
    hard_fraction: float = 0.25
    final_temperature: float = 0.02
    calib_tokens: int = 32768
    holdout: float = 0.1
    seq_len: int = 512
    e2e_steps: int = 0
    e2e_lr: float = 1e-5
    e2e_batch: int = 4
    seed: int = 0
    device: torch.device = torch.device("cpu")
    saved_dtype: torch.dtype | None = None  # the saved weights' dtype; None: the checkpoint's (fitting is float32)

    def shared_width_for(self, neurons: int) -> int:
        """Always-on neurons: what the budget leaves beside k leaves, S + k (N - S) / 2**depth = F N."""
        leaves, k = 2**self.depth, self.leaves_per_token
        if self.neurons_per_token is None or k >= leaves:
            return 0
        if self.leaf_width is not None:
            exact = max(0, min(neurons - self.leaf_width, self.neurons_per_token * neurons - k * self.leaf_width))
        else:
            exact = max(0, neurons * (self.neurons_per_token * leaves - k) / (leaves - k))
        return aligned_width(exact, neurons)

    def leaf_width_for(self, neurons: int) -> int:
        if self.leaf_width is not None:
            return self.leaf_width
        return max(1, (neurons - self.shared_width_for(neurons)) // 2**self.depth)

    def to_json(self) -> dict:
        values = dict(vars(self))
        values["device"] = str(self.device)
        values["saved_dtype"] = str(self.saved_dtype).removeprefix("torch.") if self.saved_dtype is not None else None
        return values


def validate_settings(settings: FFFSettings) -> None:
    """Everything that can be checked before a model is loaded."""
    if settings.depth < 1 or settings.depth > MAX_DEPTH:
        raise UserError(f"--depth must be between 1 and {MAX_DEPTH} (got {settings.depth})")
    share, k, leaves = settings.neurons_per_token, settings.leaves_per_token, 2**settings.depth
    if not 1 <= k <= leaves:
        raise UserError(f"--leaves-per-token must be between 1 and the {leaves} leaves of a depth-{settings.depth} tree (got {k})")
    if share is not None and not 0 < share <= 1:
        raise UserError(f"--neurons-per-token must be a fraction in (0, 1] (got {share:g})")
    if share is not None and settings.leaf_width is None and share * leaves < k - 1e-9:
        needed = math.ceil(math.log2(k / share))
        what = "one leaf alone holds" if k == 1 else f"{k} leaves alone hold"
        raise UserError(
            f"--neurons-per-token {share:g} needs --depth {needed} or more: at depth {settings.depth} "
            f"{what} {k}/{leaves} of the neurons"
        )
    if settings.leaf_width is not None and settings.leaf_width < 1:
        raise UserError(f"--leaf-width must be positive (got {settings.leaf_width})")
    if settings.steps < 0 or settings.e2e_steps < 0:
        raise UserError("--steps and --e2e-steps cannot be negative")
    if settings.batch_tokens < 1 or settings.calib_tokens < 1 or settings.seq_len < MIN_SEQ_LEN:
        raise UserError(f"--batch-tokens and --calib-tokens must be positive, --seq-len at least {MIN_SEQ_LEN}")
    if not 0 < settings.lr < 1 or not 0 <= settings.e2e_lr < 1:
        raise UserError("--lr must be in (0, 1)")
    if not 0 <= settings.hard_fraction <= 1:
        raise UserError(f"--hard-fraction must be a fraction in [0, 1] (got {settings.hard_fraction:g})")



def check_depth(settings: FFFSettings, neurons: int, name: str) -> None:
    """Each leaf starts from at least one of the block's neurons, so 2**depth cannot exceed them."""
    if 2**settings.depth > neurons:
        raise UserError(
            f"--depth {settings.depth} is too deep for {name}: {2**settings.depth} leaves but the block has {neurons} neurons"
        )


@dataclass
class BlockResult:
    """What fitting one block did (one row of the summary table)."""

    name: str
    index: int
    neurons: int
    depth: int
    leaf_width: int
    init_error: float
    final_error: float
    busiest_leaf: float  # the largest share of held-out tokens one leaf receives (1/leaves is balanced)
    seconds: float
    shared_width: int = 0
    oracle_error: float | None = None  # held-out error with each token sent where its activation mass is
    router_accuracy: float | None = None  # share of the routers' choices that agree with those labels
    leaves_per_token: int = 1

    @property
    def neurons_per_token(self) -> float:
        return neurons_per_token(self.depth, self.leaf_width, self.neurons, self.shared_width, self.leaves_per_token)

    def to_json(self) -> dict:
        return dict(vars(self)) | {"neurons_per_token": self.neurons_per_token}


def build_tree(dense: DenseWeights, settings: FFFSettings, device: torch.device) -> FastFeedForward:
    """An empty float32 tree shaped for ``dense`` (gated, biases as the block has them)."""
    return FastFeedForward(
        dense.hidden,
        settings.depth,
        settings.leaf_width_for(dense.width),
        dense.activation,
        gated=dense.w_gate is not None,
        in_bias=dense.b_in is not None,
        out_bias=dense.b_out is not None,
        shared_width=settings.shared_width_for(dense.width),
        leaves_per_token=settings.leaves_per_token,
        dtype=torch.float32,
        device=device,
    )


def fit_block(
    name: str,
    index: int,
    dense: DenseWeights,
    record: BlockRecord,
    settings: FFFSettings,
    advance: Callable[[int], None] | None = None,
) -> tuple[FastFeedForward, BlockResult]:
    """Initialise a tree from ``dense`` and train it on ``record``; returns it (float32, eval mode) and its figures."""
    began = time.perf_counter()
    dense = on_device(dense, settings.device)
    tree, router_accuracy, fit_rows, held_x, held_y = initialised_tree(dense, record, settings)
    init_error = relative_error(tree, held_x, held_y)
    _train(tree, record, fit_rows, settings, advance)
    tree.eval()
    with torch.no_grad():
        counts = torch.bincount(tree.routes(held_x).flatten(), minlength=tree.num_leaves)
        oracle = oracle_error(tree, held_x, held_y)
    result = BlockResult(
        name, index, dense.width, settings.depth, tree.leaf_width, init_error, relative_error(tree, held_x, held_y),
        counts.max().item() / max(1, held_x.shape[0]), time.perf_counter() - began, tree.shared_width, oracle, router_accuracy,
        tree.leaves_per_token,
    )
    return tree, result



def initialised_tree(dense: DenseWeights, record: BlockRecord, settings: FFFSettings):
    """A tree built from ``dense`` on the record's fit rows (no training yet), in eval mode.

    Returns (tree, router accuracy, number of fit rows, held-out inputs, held-out outputs): the last share of
    the rows (other documents) is held out for every error reported.
    """
    device = settings.device
    rows = record.inputs.shape[0]
    fit_rows = max(1, min(rows - 1, round(rows * (1 - settings.holdout))))
    held_x = record.inputs[fit_rows:].to(device, torch.float32)
    held_y = record.outputs[fit_rows:].to(device, torch.float32)
    tree = build_tree(dense, settings, device)
    init_rows = record.inputs[: min(fit_rows, INIT_ROWS)].to(device, torch.float32)
    router_accuracy = initialise_tree(tree, dense, init_rows, settings.seed, settings.refit)
    return tree.eval(), router_accuracy, fit_rows, held_x, held_y


def relative_error(tree: FastFeedForward, x: torch.Tensor, y: torch.Tensor) -> float:
    """||hard tree(x) - y|| / ||y|| over all rows."""
    with torch.no_grad():
        return ((tree.hard_forward(x) - y).norm() / y.norm().clamp_min(1e-12)).item()


def on_device(dense: DenseWeights, device: torch.device) -> DenseWeights:
    def move(tensor):
        return tensor.to(device) if tensor is not None else None

    return DenseWeights(move(dense.w_in), move(dense.b_in), move(dense.w_gate), move(dense.w_out), move(dense.b_out), dense.activation)


def temperature_at(step: int, soft_steps: int, final: float) -> float:
    """Geometric from 1 at the first soft step to ``final`` at the last one."""
    if soft_steps <= 1:
        return final
    return math.exp(math.log(final) * step / (soft_steps - 1))


def _train(tree: FastFeedForward, record: BlockRecord, fit_rows: int, settings: FFFSettings, advance) -> None:
    if settings.steps == 0:
        return
    device = settings.device
    generator = torch.Generator().manual_seed(settings.seed)
    scale = record.outputs[:fit_rows].float().var().clamp_min(1e-12).item()
    optimiser = torch.optim.AdamW(tree.parameters(), lr=settings.lr, weight_decay=0.0)
    soft_steps = round(settings.steps * (1 - settings.hard_fraction))
    batch = min(settings.batch_tokens, fit_rows)
    for step in range(settings.steps):
        rows = torch.randint(0, fit_rows, (batch,), generator=generator)
        x = record.inputs[rows].to(device, torch.float32)
        y = record.outputs[rows].to(device, torch.float32)
        if step < soft_steps:
            tree.train()
            tree.temperature = temperature_at(step, soft_steps, settings.final_temperature)
        else:
            tree.eval()  # hard routing: the leaves learn to serve the tokens they will actually get
        loss = F.mse_loss(tree(x), y) / scale
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if advance is not None:
            advance(1)


def distill_end_to_end(
    student: nn.Module,
    teacher: nn.Module,
    trees: list[FastFeedForward],
    calibration: Calibration,
    settings: FFFSettings,
    advance: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """Train the trees so ``student`` matches ``teacher``'s outputs; returns the held-out loss before and after."""
    device = settings.device
    windows = calibration.input_ids.shape[0]
    held = max(1, round(windows * settings.holdout)) if windows > 1 else 0
    fit_windows = windows - held
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    parameters = [p for tree in trees for p in tree.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(parameters, lr=settings.e2e_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)

    def batch(rows):
        return calibration.input_ids[rows].to(device), calibration.attention_mask[rows].to(device)

    held_rows = torch.arange(fit_windows, windows) if held else torch.arange(windows)
    before = _held_out_loss(student, teacher, trees, batch, held_rows, settings)
    for _ in range(settings.e2e_steps):
        rows = torch.randint(0, max(1, fit_windows), (min(settings.e2e_batch, max(1, fit_windows)),), generator=generator)
        ids, mask = batch(rows)
        with torch.no_grad():
            target = model_outputs(teacher, ids, mask)
        _set_hard(trees)
        loss = output_distance(model_outputs(student, ids, mask), target, mask)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if advance is not None:
            advance(1)
    after = _held_out_loss(student, teacher, trees, batch, held_rows, settings)
    for tree in trees:
        tree.eval()
    return before, after


def _held_out_loss(student, teacher, trees, batch, rows: torch.Tensor, settings: FFFSettings) -> float:
    """The e2e loss on held-out windows with hard routing (as the model will run)."""
    for tree in trees:
        tree.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, rows.numel(), settings.e2e_batch):
            ids, mask = batch(rows[start : start + settings.e2e_batch])
            total += output_distance(model_outputs(student, ids, mask), model_outputs(teacher, ids, mask), mask).item() * ids.shape[0]
    return total / max(1, rows.numel())


def _set_hard(trees: list[FastFeedForward]) -> None:
    """Train under the routing the model will run with: one (or k) leaves per token, exact, not the soft mix.

    The soft forward weights every leaf by its path probability (they sum to one), which for leaves that
    are disjoint parts of the block is another function than the hard one (k leaves at weight one each);
    measured on all-MiniLM-L6-v2, e2e steps in soft mode did not carry over to the hard model. The
    routers, classifiers fitted on the dense block's activation mass, get no gradient here and stay as fitted."""
    for tree in trees:
        tree.eval()


def model_outputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[str, torch.Tensor]:
    output = model(input_ids=ids, attention_mask=mask)
    logits = getattr(output, "logits", None)
    if logits is not None:
        return "logits", logits.float()
    return "hidden", output.last_hidden_state.float()


def output_distance(student: tuple[str, torch.Tensor], teacher: tuple[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token for logits; for hidden states, 1 - cosine of the mean-pooled embeddings
    (what sentence-embedding models are used through, and what `compress eval` reports for them)."""
    kind, predicted = student
    _, target = teacher
    keep = mask.bool()
    if kind == "logits":
        return F.kl_div(F.log_softmax(predicted[keep], -1), F.log_softmax(target[keep], -1), log_target=True, reduction="batchmean")
    return 1 - F.cosine_similarity(mean_pooled(predicted, mask), mean_pooled(target, mask), dim=-1).mean()

