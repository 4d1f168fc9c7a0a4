"""How much each layer's output error costs the model: the weights a bit budget compares layers with.

A layer's relative output error says how far its own output moved, not what that does to the model:
an error in the head lands on the logits, one in a value projection is diluted by the residual stream.
To second order, a perturbation d of a layer's output y raises the loss by about d^T F d / 2, F the
Fisher matrix of the loss in y; for a perturbation of relative size e spread over y's directions
that is e * E|y|^2 * E|g|^2 / dim(y) / 2 with g the loss's gradient in y (HAWQ-V2 and SqueezeLLM
weigh layers by the same Fisher information). So one forward and backward pass of the original
model on a few calibration windows (the next-token loss) gives every layer its weight
s = E|y|^2 * E|g|^2 / dim(y), and the allocation minimises the sum of s * e.

A tied embedding / head gets two: as the input embedding (its output) and as the head (the logits).
Models without a language-model loss (a bare encoder) get no weights: every layer then counts alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .stack import call_model


class _Moments:
    """Running E|y|^2 and E|g|^2 (per token) of one module's output."""

    def __init__(self) -> None:
        self.output = 0.0
        self.gradient = 0.0
        self.tokens = 0
        self.width = 0

    @property
    def weight(self) -> float:
        if not self.tokens:
            return 0.0
        return (self.output / self.tokens) * (self.gradient / self.tokens) / max(1, self.width)


def output_sensitivities(model: nn.Module, modules: dict[str, nn.Module], windows: Iterable[Tensor], device: torch.device) -> dict[str, float]:
    """s per named module from the next-token loss of ``model`` on ``windows`` (one window per pass); {} without a loss."""
    moments = {name: _Moments() for name in modules}
    captured: list[tuple[str, Tensor]] = []

    def keep(name: str):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, Tensor) and tensor.requires_grad:
                captured.append((name, tensor))
        return hook

    home = next(model.parameters()).device
    needs = {p: p.requires_grad for p in model.parameters()}
    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    model.to(device)
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        with torch.enable_grad():
            for window in windows:
                captured.clear()
                output = call_model(model, window.to(device))
                logits = getattr(output, "logits", None)
                if logits is None:
                    return {}
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), window[:, 1:].flatten().to(device))
                gradients = torch.autograd.grad(loss, [t for _, t in captured], allow_unused=True)
                terms = window[:, 1:].numel()  # the loss is their mean: a token's own gradient is terms times this
                for (name, tensor), gradient in zip(captured, gradients):
                    if gradient is None:
                        continue
                    entry = moments[name]
                    entry.output += float(tensor.detach().float().pow(2).sum())
                    entry.gradient += float((gradient.float() * terms).pow(2).sum())
                    entry.tokens += tensor.numel() // tensor.shape[-1]
                    entry.width = tensor.shape[-1]
                del output, logits, loss, gradients
    finally:
        for handle in handles:
            handle.remove()
        for parameter, needed in needs.items():
            parameter.requires_grad_(needed)
        captured.clear()
        model.to(home)
    return {name: entry.weight for name, entry in moments.items() if entry.tokens}
