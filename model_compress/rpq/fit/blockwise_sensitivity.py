"""The layers' Fisher weights (``sensitivity``) from one block at a time, so that the whole model never has to be
on the device, or in memory, at once.

``sensitivity.output_sensitivities`` runs the model forward and back in one piece. The same gradients come from
the blocks one by one: forward through the stack without autograd, keeping each block's input hidden states
(a few windows: what SENSITIVITY_WINDOWS gives); the tail (final norm, head) with autograd, from the last hidden
states, gives the loss and its gradient there; then back through the blocks in reverse, each rerun with autograd
on its kept input and differentiated with the gradient of its output; last, into the layers before the stack
(the embeddings). Each block's weights are read twice (``BlockWeights``: from memory or from the checkpoint),
whatever the number of windows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ...core.block_weights import BlockWeights
from .sensitivity import LABEL_SEED, OutputMoments, Sensitivity, capturing_outputs, fisher_probe
from .stack import BlockCall, BlockRun, BlockStack, capture_inputs, outside_on, replay_tail


def blockwise_sensitivities(
    model: nn.Module,
    stack: BlockStack,
    modules: dict[str, nn.Module],
    windows: list[Tensor],
    device: torch.device,
    weights: BlockWeights,
) -> dict[str, Sensitivity]:
    """F_jj and E[y_j^2] per output channel of each named module, as ``output_sensitivities`` gives; {} without logits."""
    moments = {name: OutputMoments() for name in modules}
    captured: list[tuple[str, Tensor]] = []
    head = f"{stack.prefix}." if stack.prefix else ""
    outside = [p for n, p in model.named_parameters() if not n.startswith(head)]
    generator = torch.Generator(device=device).manual_seed(LABEL_SEED)
    # the parts outside the stack stay on the device until the last backward: autograd keeps the parameters
    # themselves (not copies), and one moved back to the host between forward and backward breaks the backward
    with capturing_outputs(modules, captured), _outside_needs_grad(outside), outside_on(model, stack, device):
        calls, before = [], []
        for window in windows:  # the graph from each window's embeddings to its first block's input, kept
            calls += capture_inputs(model, stack, [window], device, keep_graph=True)
            before.append(list(captured))
            captured.clear()
        inputs, outputs, as_tuple = _forward(stack, calls, device, weights)
        gradients: list[Tensor] = []
        for window, output in zip(windows, outputs):  # in window order: the labels drawn as the one-piece pass draws them
            leaf = output.detach().requires_grad_(True)
            answers: list = []
            replay_tail(model, stack, [window], BlockRun([leaf], as_tuple), device, lambda i, out: answers.append(out),
                        with_grad=True)
            loss = fisher_probe(answers[0], generator)
            if loss is None:
                return {}
            gradients.append(_accumulate(list(captured), loss, None, moments, also=leaf))
            captured.clear()
        for position in reversed(range(len(stack.blocks))):
            block, name = stack.blocks[position], stack.block_name(position)
            weights.enter(block, name, device)
            for index, call in enumerate(calls):
                gradients[index] = _block_backward(block, call, inputs[index][position], gradients[index], captured, moments)
            weights.leave(block, name, keep=False)
        for index, call in enumerate(calls):
            _accumulate(before[index], call.hidden, gradients[index], moments)
    return {name: entry.sensitivity() for name, entry in moments.items() if entry.tokens}


def _forward(stack: BlockStack, calls: list[BlockCall], device: torch.device,
             weights: BlockWeights) -> tuple[list[list[Tensor]], list[Tensor], bool]:
    """Without autograd: each window's input to every block, the stack's output, and whether blocks answer tuples."""
    inputs: list[list[Tensor]] = [[] for _ in calls]
    hidden = [call.hidden.detach() for call in calls]
    as_tuple = False
    for position, block in enumerate(stack.blocks):
        name = stack.block_name(position)
        weights.enter(block, name, device)
        with torch.no_grad():
            for index, call in enumerate(calls):
                inputs[index].append(hidden[index])
                run = call.with_hidden(hidden[index])
                out = block(*run.args, **run.kwargs)
                as_tuple = isinstance(out, (tuple, list))
                hidden[index] = out[0] if as_tuple else out
        weights.leave(block, name, keep=False)
    return inputs, hidden, as_tuple


def _block_backward(block: nn.Module, call: BlockCall, hidden: Tensor, gradient: Tensor,
                    captured: list[tuple[str, Tensor]], moments: dict[str, OutputMoments]) -> Tensor:
    """One block rerun with autograd on its kept input; its layers' moments; the gradient at its input."""
    leaf = hidden.detach().requires_grad_(True)
    captured.clear()
    with torch.enable_grad():
        rerun = call.with_hidden(leaf)
        out = block(*rerun.args, **rerun.kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        upstream = _accumulate(list(captured), out, gradient, moments, also=leaf)
    captured.clear()
    return upstream


def _accumulate(layers: list[tuple[str, Tensor]], output: Tensor, gradient: Tensor | None, moments: dict[str, OutputMoments],
                also: Tensor | None = None) -> Tensor | None:
    """Differentiate ``output`` (along ``gradient``; None for a scalar loss) into the captured layers' outputs, whose
    moments gain the result, and into ``also``, whose gradient is returned."""
    targets = [t for _, t in layers] + ([also] if also is not None else [])
    if not targets:
        return None
    found = torch.autograd.grad(output, targets, grad_outputs=gradient, allow_unused=True)
    for (name, tensor), grad in zip(layers, found):
        if grad is not None:
            moments[name].add(tensor, grad)
    return found[-1] if also is not None else None


@contextlib.contextmanager
def _outside_needs_grad(parameters: list[nn.Parameter]) -> Iterator[None]:
    """The parameters outside the stack require grad for the duration, so the embeddings' outputs are tracked."""
    needed = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter, need in zip(parameters, needed):
            parameter.requires_grad_(need)
