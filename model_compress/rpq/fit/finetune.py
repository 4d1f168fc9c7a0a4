"""End-to-end fine-tuning of a converted model towards the original's outputs, codes fixed.

After layer-wise fitting every layer is close to the original on its own inputs, but the errors
add up through the model. Fine-tuning trains what is cheap to change and stored anyway: the
codebooks of every RPQ layer, the norms' weights and biases, and the RPQ layers' biases (codes
stay as fitted, as in AQLM's and VPTQ's fine-tuning), by KL divergence to the original model's
next-token distributions on the calibration windows (encoders without a head: one minus the
cosine of the final hidden states). The original's distributions are kept small: its top
``TOP_K`` log-probabilities per token plus the mass of the rest. Training keeps float32 weights (int8
codebooks as floats) and, on CUDA, computes its steps under bfloat16 autocast; all is rounded back to its
storage at the end; the held-out windows decide
which state is kept (the one with the lowest held-out loss, the fit before training included).

A learning rate that suits one model can overshoot on another (1e-4 suits SmolLM2-135M; on
all-MiniLM-L6-v2 it doubled the held-out loss within 10 steps while 1e-5 lowered it). So training
backs off: when a held-out check finds the loss above the best so far, the best state comes back, Adam
starts afresh and the learning rate halves (the schedule's shape kept).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.placement import return_tensors, tensor_devices
from ...core.workers import Workers
from ..kernels.plans import invalidate_all

from .activation_checkpoint import CheckpointChoice, checkpointed_blocks, choose
from .codebooks import CodebookSet
from .stack import call_model, find_stack

TOP_K = 128  # teacher log-probabilities kept per token
WARMUP_FRACTION = 0.05
EVALUATIONS = 8  # held-out evaluations during training (plus one before): where backing off can happen
BACKOFF = 0.5  # the learning rate's factor each time a held-out check finds the loss above the best


@dataclass
class FinetuneSettings:
    """Steps (0: none), Adam's learning rate, calibration windows per step, blocks checkpointed (auto, on, off)."""

    steps: int = 0
    lr: float = 1e-4
    windows_per_step: int = 1
    seed: int = 0
    checkpointing: str = "auto"


class Teacher:
    """The original model's outputs on the calibration windows, window by window (fit ones, held-out ones)."""

    def __init__(self, top_k: int = TOP_K) -> None:
        self.top_k = top_k
        self.fit: list[tuple[Tensor, ...]] = []
        self.held_out: list[tuple[Tensor, ...]] = []

    def record(self, held_out: bool, batch: int, output: Any) -> None:
        """``passes.OnOutput``: keep each window's targets on the CPU."""
        target = self.held_out if held_out else self.fit
        for window in _targets(output, self.top_k):
            target.append(window)

    @classmethod
    def joined(cls, parts: list[Teacher], windows: int, per_batch: int) -> Teacher:
        """One teacher from the parts of processes that recorded every ``len(parts)``-th batch of ``per_batch`` fit
        windows each (``core.workers.Workers.share``; ``windows`` in all), in window order; the held-out windows
        from the first (every process ran them all)."""
        teacher = cls(parts[0].top_k)
        taken = [0] * len(parts)
        for batch, start in enumerate(range(0, windows, per_batch)):
            part = batch % len(parts)
            count = min(per_batch, windows - start)
            teacher.fit += parts[part].fit[taken[part]:taken[part] + count]
            taken[part] += count
        teacher.held_out = list(parts[0].held_out)
        return teacher

    def tensors(self) -> dict[str, Tensor]:
        """Every window's targets by name ("fit.3.0": fit window 3, its first tensor), to be saved."""
        return {f"{part}.{index}.{j}": tensor.contiguous() for part, windows in (("fit", self.fit), ("held_out", self.held_out))
                for index, window in enumerate(windows) for j, tensor in enumerate(window)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], top_k: int = TOP_K) -> Teacher:
        """The teacher ``tensors`` saved."""
        teacher = cls(top_k)
        for part in ("fit", "held_out"):
            keys = sorted((tuple(int(n) for n in key.split(".")[1:]), key) for key in tensors if key.startswith(f"{part}."))
            windows: dict[int, list[Tensor]] = {}
            for (index, _), key in keys:
                windows.setdefault(index, []).append(tensors[key])
            setattr(teacher, part, [tuple(windows[index]) for index in sorted(windows)])
        return teacher


def _targets(output: Any, top_k: int) -> list[tuple[Tensor, ...]]:
    """Per window: (top log-probs, their ids) of a model with logits, else (final hidden states,). A window at a time:
    float32 log-probabilities of a whole batch would be 8 bytes a logit more (4 windows of a 128k vocabulary: 8 GB)."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        targets = []
        for window in logits:
            log_probs = F.log_softmax(window.float(), dim=-1)
            values, ids = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
            targets.append((values.cpu(), ids.to(torch.int32).cpu()))
        return targets
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return [(h.float().cpu(),) for h in hidden]


def distillation_loss(output: Any, targets: list[tuple[Tensor, ...]]) -> Tensor:
    """Mean over tokens of KL(teacher || student) on the top-k + rest split, or 1 - cos of hidden states."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        values = torch.stack([t[0] for t in targets]).to(logits.device)
        ids = torch.stack([t[1] for t in targets]).to(logits.device).long()
        log_q = F.log_softmax(logits.float(), dim=-1)
        log_q_top = log_q.gather(-1, ids)
        p_top = values.exp()
        p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-12)
        kl = (p_top * (values - log_q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
        return kl.mean()
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    reference = torch.stack([t[0] for t in targets]).to(hidden.device)
    return (1 - F.cosine_similarity(hidden.float(), reference, dim=-1)).mean()


@dataclass
class FinetuneReport:
    """What fine-tuning did: steps, held-out loss before / after, the curve, which state was kept."""

    steps: int
    lr: float
    held_out_kl_before: float
    held_out_kl_after: float
    best_step: int
    seconds: float
    curve: list[dict] = field(default_factory=list)
    backoffs: int = 0
    checkpointing: CheckpointChoice | None = None

    @property
    def reverted(self) -> bool:
        return self.best_step == 0 and self.steps > 0

    def to_json(self) -> dict:
        return {
            "steps": self.steps, "lr": self.lr, "held_out_kl_before": self.held_out_kl_before,
            "held_out_kl_after": self.held_out_kl_after, "best_step": self.best_step, "reverted": self.reverted,
            "backoffs": self.backoffs, "seconds": self.seconds, "curve": self.curve,
            "activation_checkpointing": self.checkpointing.to_json() if self.checkpointing else None,
        }


def held_out_loss(model: nn.Module, windows: Tensor, teacher: list[tuple[Tensor, ...]], device: torch.device) -> float:
    """Mean distillation loss of ``model`` on the held-out windows (one window per forward)."""
    total = 0.0
    with torch.no_grad():
        for index in range(windows.shape[0]):
            output = call_model(model, windows[index : index + 1].to(device))
            total += float(distillation_loss(output, teacher[index : index + 1]))
    return total / max(1, windows.shape[0])


def finetune(
    model: nn.Module,
    fit_windows: Tensor,
    held_windows: Tensor,
    teacher: Teacher,
    settings: FinetuneSettings,
    device: torch.device,
    on_step: Callable[[int, int], None] | None = None,
    workers: Workers | None = None,
) -> FinetuneReport:
    """Train codebooks, norms and RPQ biases for ``settings.steps`` steps; keep the best held-out state.

    ``workers``: processes that each run this on the same model (``core.workers``): every step's windows are split
    among them and the gradients summed (data parallel), so each takes the same step a lone process would (to
    float rounding); the leader's held-out figures decide the state kept, for all."""
    workers = workers or Workers()
    start = time.perf_counter()
    homes = tensor_devices(model)
    thawed = _thaw_int8_codebooks(model)
    dtypes = _dtypes(model)
    _place(model, device, torch.float32)
    trainable = _trainable(model)
    stack = find_stack(model, [name for name, module in model.named_modules() if _is_rpq(module)])
    checkpointing = choose(model, stack, fit_windows.shape[1] * settings.windows_per_step, torch.device(device),
                           settings.checkpointing)
    judge = held_windows if held_windows.shape[0] else fit_windows[:1]
    judge_teacher = teacher.held_out if held_windows.shape[0] else teacher.fit[:1]
    was_training = model.training
    model.eval()  # no dropout: the student should match the teacher's deterministic outputs
    before = workers.broadcast(held_out_loss(model, judge, judge_teacher, device), 0)
    run = _Training(model, trainable, settings, device, workers, lambda: held_out_loss(model, judge, judge_teacher, device),
                    before)
    if settings.steps > 0 and trainable:
        with checkpointed_blocks(stack, checkpointing.checkpointed):
            run.train(fit_windows, teacher, on_step)
    best, curve, backoffs = run.best, run.curve, run.backoffs
    with torch.no_grad():
        for parameter, kept in zip(trainable, best[2]):
            parameter.copy_(kept)
    for parameter in trainable:
        parameter.requires_grad_(False)
    _restore_dtypes(model, dtypes)
    _freeze_int8_codebooks(thawed)
    return_tensors(model, homes)
    invalidate_all()  # launch plans kept by the layers hold these tensors
    model.train(was_training)
    after = held_out_loss(_place(model, device), judge, judge_teacher, device) if settings.steps else before
    return_tensors(model, homes)
    invalidate_all()  # launch plans kept by the layers hold these tensors
    return FinetuneReport(settings.steps, settings.lr, before, after, best[1], time.perf_counter() - start, curve, backoffs,
                          checkpointing)


class _Training:
    """The steps of one fine-tuning: Adam on the trainable tensors, held-out checks that keep the best state and back
    off the learning rate where a check finds the loss above the best (module docstring)."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], settings: FinetuneSettings, device: torch.device,
                 workers: Workers, held_out: Callable[[], float], before: float) -> None:
        """``before``: the held-out loss of the fit before training, the first state kept."""
        self.model, self.trainable, self.settings, self.device, self.workers = model, trainable, settings, device, workers
        self.held_out = held_out  # the leader's held-out loss of the current state
        self.best: tuple[float, int, list[Tensor]] = (before, 0, [p.detach().clone() for p in trainable])
        self.curve: list[dict] = [{"step": 0, "held_out": before}]
        self.backoffs = 0

    def train(self, fit_windows: Tensor, teacher: Teacher, on_step: Callable[[int, int], None] | None) -> None:
        settings = self.settings
        shape = _warmup_cosine(settings.steps)
        optimizer = torch.optim.Adam(self.trainable, lr=settings.lr)
        generator = torch.Generator().manual_seed(settings.seed)
        order: list[int] = []
        running, counted = 0.0, 0
        checks = {max(1, round(settings.steps * (i + 1) / EVALUATIONS)) for i in range(EVALUATIONS)}
        for step in range(1, settings.steps + 1):
            if len(order) < settings.windows_per_step:
                order += torch.randperm(fit_windows.shape[0], generator=generator).tolist()
            chosen, order = order[: settings.windows_per_step], order[settings.windows_per_step :]
            optimizer.zero_grad(set_to_none=True)
            loss = self._step_loss(fit_windows, teacher, chosen)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * BACKOFF**self.backoffs * shape(step - 1)
            optimizer.step()
            running, counted = running + float(loss.detach()), counted + 1
            if step in checks:
                if self._check(step, running / counted):  # overshot: a fresh Adam for the restored state
                    optimizer = torch.optim.Adam(self.trainable, lr=settings.lr)
                running, counted = 0.0, 0
            if on_step is not None:
                on_step(step, settings.steps)

    def _step_loss(self, fit_windows: Tensor, teacher: Teacher, chosen: list[int]) -> Tensor:
        """This process's share of the step's windows, forward and backward; the step's loss (summed over processes)."""
        mine = self.workers.share(chosen)  # all of them alone
        loss = torch.zeros((), device=self.device)
        if mine:
            with torch.enable_grad(), _mixed_precision(self.device):
                output = call_model(self.model, fit_windows[mine].to(self.device))
                # this share's part of the mean over every chosen window (windows are equally long)
                loss = distillation_loss(output, [teacher.fit[i] for i in mine]) * (len(mine) / len(chosen))
                loss.backward()
        if self.workers.spread:
            loss = _summed_step(self.trainable, loss.detach().float(), self.workers)
        return loss

    def _check(self, step: int, train_loss: float) -> bool:
        """A held-out check: a better state is kept; a worse one, before the last step, puts the best back and halves
        the rate (True: the caller starts Adam afresh)."""
        score = self.workers.broadcast(self.held_out(), 0)
        self.curve.append({"step": step, "train": train_loss, "held_out": score, "lr_factor": BACKOFF**self.backoffs})
        if score < self.best[0]:
            self.best = (score, step, [p.detach().clone() for p in self.trainable])
            return False
        if step >= self.settings.steps:
            return False
        with torch.no_grad():
            for parameter, kept in zip(self.trainable, self.best[2]):
                parameter.copy_(kept)
        self.backoffs += 1
        return True


def _summed_step(trainable: list[nn.Parameter], loss: Tensor, workers: Workers) -> Tensor:
    """The gradients (and the loss) of every process's share summed in one collective, in place; the summed loss."""
    for parameter in trainable:
        if parameter.grad is None:  # a process without windows this step adds nothing
            parameter.grad = torch.zeros_like(parameter)
    flat = workers.sum_(torch.cat([loss.reshape(1), *(parameter.grad.float().reshape(-1) for parameter in trainable)]))
    offset = 1
    for parameter in trainable:
        count = parameter.grad.numel()
        parameter.grad.copy_(flat[offset:offset + count].view_as(parameter.grad))
        offset += count
    return flat[0]


def _mixed_precision(device: torch.device):
    """bfloat16 autocast for the training steps on CUDA (the weights, Adam's state and the loss stay float32; the
    held-out checks that choose the kept state run in float32); nothing elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return factor


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """Codebooks and biases of RPQ modules, weights and biases of norms; everything else frozen."""
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if _is_rpq(module):
            picked = [own.get("codebooks"), own.get("bias")]
        elif "norm" in type(module).__name__.lower():
            picked = [own.get("weight"), own.get("bias")]
        else:
            picked = []
        for parameter in picked:
            if parameter is not None and parameter.is_floating_point():
                chosen[id(parameter)] = parameter
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    return list(chosen.values())


def _is_rpq(module: nn.Module) -> bool:
    return hasattr(module, "indices") and hasattr(module, "code_bits")


def _place(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move (and cast) with torch's own Module methods: transformers refuses `.float()` and dtype moves on a
    model that carries a quantization config, which is right for users but not for training its codebooks."""
    nn.Module.to(model, device)
    if dtype is not None:
        nn.Module.to(model, dtype)
    return model


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Every tensor's dtype, and every RPQ module's compute dtype (keyed ``module name + "#compute"``)."""
    found = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    found.update({f"{name}#compute": m.compute_dtype for name, m in model.named_modules() if hasattr(m, "compute_dtype")})
    return found


def _restore_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Every tensor back to the dtype it had before training (codebooks round to their storage here)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            wanted = dtypes.get(name)
            if wanted is not None and tensor.dtype != wanted:
                tensor.data = tensor.data.to(wanted)
    invalidate_all()  # launch plans kept by the layers hold these tensors
    for name, module in model.named_modules():
        if f"{name}#compute" in dtypes:
            module.compute_dtype = dtypes[f"{name}#compute"]


def _thaw_int8_codebooks(model: nn.Module) -> list[nn.Module]:
    """int8 codebooks become float32 Parameters (their values) for training; returns the modules changed."""
    thawed = []
    for module in model.modules():
        if getattr(module, "codebook_scales", None) is not None and hasattr(module, "code_bits"):
            values = module.codebook_values(torch.float32).detach()
            del module._buffers["codebooks"], module._buffers["codebook_scales"]
            module.codebooks = nn.Parameter(values)
            module.codebook_scales = None
            thawed.append(module)
    return thawed


def _freeze_int8_codebooks(modules: list[nn.Module]) -> None:
    """Trained float codebooks back to int8 with one scale per codebook, the scales in the layer's compute dtype
    (where they were before training: ``_restore_dtypes`` has given that dtype back by now)."""
    for module in modules:
        values = module.codebooks.detach().float()
        books = CodebookSet(values, torch.full(values.shape[:1], values.shape[1]), torch.ones(values.shape[0], dtype=torch.bool))
        levels, scales = books.int8_parts()
        del module._parameters["codebooks"]
        module.__dict__.pop("codebook_scales", None)
        module.register_buffer("codebooks", levels)
        module.register_buffer("codebook_scales", scales.to(module.compute_dtype))
