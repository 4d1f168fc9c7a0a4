"""How much each layer's output error costs the model: the weights a bit budget compares layers with.

A layer's relative output error says how far its own output moved, not what that does to the model: an
error in the head lands on the logits, one in a value projection is diluted by the residual stream. To
second order, a perturbation d of a layer's output y (per token) raises the KL divergence of the model's
next-token distribution from the original's by d^T F d / 2, F the Fisher information of that distribution
in y. Taking F diagonal, an error that moves output channel j by r_j = E[d_j^2] costs

    KL ~ 1/2 * sum_j F_jj * r_j,      F_jj = E[g_j^2],

g the gradient of log q(y') in the layer's output with y' drawn from the model's own prediction q (so
E[g g^T] is the true Fisher, the Hessian of the KL at the original, not the empirical one of the text's
next tokens). One forward and backward pass of the original model on a few calibration windows gives every
layer its F_jj and E[y_j^2] per output channel (HAWQ-V2 and SqueezeLLM weigh layers by the same Fisher
information). A format's cost is then its Fisher-weighted relative error (sum_j F_jj r_j / sum_j F_jj E[y_j^2],
measured on the layer's calibration inputs) times the layer's weight 1/2 sum_j F_jj E[y_j^2]: the predicted
KL in nats per token. ``benchmarks/rpq/sensitivity_check.py`` checks the prediction against the KL measured
with one layer at a time quantized.

A tied embedding / head gets two weights: as the input embedding (its output) and as the head (the logits).

A model without a language-model head (a sentence encoder) is judged by its mean-pooled, normalised embedding
o, and 1 - cos(o, o') ~ |o - o'|^2 / 2: its second-order cost is the Gauss-Newton term, J^T J with J the
Jacobian of o in the layer's output. The same backward pass estimates its diagonal: the gradient of v^T o for
a random Gaussian v has E[g g^T] = J^T J (Hutchinson's estimator), one draw of v per window; the weights then
predict 1 - cos of the pooled embedding instead of a KL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .stack import call_model

LABEL_SEED = 0  # the labels drawn from the model's own prediction: the same draw on every run


@dataclass
class Sensitivity:
    """Per output channel of one module: the Fisher diagonal E[g_j^2] and the output energy E[y_j^2] (per token)."""

    fisher: Tensor
    energy: Tensor

    @property
    def weight(self) -> float:
        """1/2 sum_j F_jj E[y_j^2]: the predicted KL (nats per token) of a Fisher-weighted relative error of 1."""
        return 0.5 * float((self.fisher * self.energy).sum())

    @property
    def isotropic_weight(self) -> float:
        """1/2 mean_j F_jj sum_j E[y_j^2]: the same for an error spread over the channels like the output itself
        (what a plain relative error measures)."""
        return 0.5 * float(self.fisher.mean() * self.energy.sum())

    def to_json(self) -> dict:
        return {"weight": self.weight, "isotropic_weight": self.isotropic_weight, "output_energy": float(self.energy.sum())}


class OutputMoments:
    """Running sums of g_j^2 and y_j^2 over the tokens of one module's output."""

    def __init__(self) -> None:
        self.output: Tensor | None = None
        self.gradient: Tensor | None = None
        self.tokens = 0

    def add(self, output: Tensor, gradient: Tensor) -> None:
        width = output.shape[-1]
        y = output.detach().float().reshape(-1, width)
        g = gradient.float().reshape(-1, width)
        if self.output is None:
            self.output, self.gradient = y.new_zeros(width), y.new_zeros(width)
        self.output += y.pow(2).sum(0)
        self.gradient += g.pow(2).sum(0)
        self.tokens += y.shape[0]

    def sensitivity(self) -> Sensitivity:
        return Sensitivity((self.gradient / self.tokens).cpu(), (self.output / self.tokens).cpu())


@contextlib.contextmanager
def capturing_outputs(modules: dict[str, nn.Module], captured: list[tuple[str, Tensor]]) -> Iterator[None]:
    """Forward hooks that append (name, output) for every named module's output that autograd tracks."""

    def keep(name: str):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, Tensor) and tensor.requires_grad:
                captured.append((name, tensor))
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()


def output_sensitivities(
    model: nn.Module, modules: dict[str, nn.Module], windows: Iterable[Tensor], device: torch.device
) -> dict[str, Sensitivity]:
    """F_jj and E[y_j^2] per output channel of each named module, from ``windows`` (one per pass); {} without logits."""
    moments = {name: OutputMoments() for name in modules}
    captured: list[tuple[str, Tensor]] = []
    home = next(model.parameters()).device
    needs = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator(device=device).manual_seed(LABEL_SEED)
    model.to(device)
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        with capturing_outputs(modules, captured), torch.enable_grad():
            for window in windows:
                captured.clear()
                output = call_model(model, window.to(device))
                loss = fisher_probe(output, generator)
                if loss is None:
                    return {}
                gradients = torch.autograd.grad(loss, [t for _, t in captured], allow_unused=True)
                for (name, tensor), gradient in zip(captured, gradients):
                    if gradient is not None:
                        moments[name].add(tensor, gradient)
                del output, loss, gradients
    finally:
        for parameter, needed in needs.items():
            parameter.requires_grad_(needed)
        model.to(home)
    return {name: entry.sensitivity() for name, entry in moments.items() if entry.tokens}


def fisher_probe(output, generator: torch.Generator) -> Tensor | None:
    """The scalar whose gradients' second moments are the Fisher (or Gauss-Newton) diagonal; None when the output
    has neither logits nor hidden states."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        flat = logits.flatten(0, 1).float()
        with torch.no_grad():  # labels from the model's own prediction: E[g g^T] is then the true Fisher
            labels = torch.multinomial(torch.softmax(flat, dim=-1), 1, generator=generator).squeeze(1)
        # summed over tokens: each token's gradient is its own log-likelihood's
        return nn.functional.cross_entropy(flat, labels, reduction="sum")
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        hidden = output[0]
    if hidden is None or hidden.dim() != 3:
        return None
    pooled = nn.functional.normalize(hidden.float().mean(1), dim=-1)  # calibration windows have no padding
    direction = torch.randn(pooled.shape, generator=generator, device=pooled.device)
    # times sqrt(tokens): a window's 1 - cos sums its tokens' terms, and the moments are kept per token
    return (pooled * direction).sum() * hidden.shape[1] ** 0.5
