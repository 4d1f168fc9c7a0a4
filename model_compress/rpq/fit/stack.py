"""Running a model one block at a time, so each block is fitted on what the compressed blocks before it produce.

GPTQ's sequential scheme, for any transformers model whose layers sit in one repeated stack (a
ModuleList of blocks of one class: ``model.layers``, ``transformer.h``, ``encoder.layer``):
  * ``capture_inputs`` runs the model until the first block and keeps each batch's call to it
    (hidden states plus every keyword the model passes: masks, rotary tables, positions);
  * ``run_block`` calls one block on those hidden states (on the fitting device), giving the
    hidden states for the next block; only one block's inputs are ever held;
  * ``replay_tail`` runs what comes after the stack (final norm, head) on the last block's
    outputs, with every block stubbed out, so head statistics and teacher logits cost no second
    pass through the blocks.
Modules outside the stack are moved to the device only while those short runs need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.plans import invalidate_all


@dataclass
class BlockStack:
    """The repeated blocks of a model: ``prefix`` is the ModuleList's name, ``blocks`` the list itself."""

    prefix: str
    blocks: nn.ModuleList

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}" if self.prefix else str(index)

    def index_of(self, layer_name: str) -> int | None:
        """Which block a layer belongs to, or None when it is outside the stack."""
        head = f"{self.prefix}." if self.prefix else ""
        if not layer_name.startswith(head):
            return None
        first = layer_name[len(head) :].split(".", 1)[0]
        return int(first) if first.isdigit() and int(first) < len(self.blocks) else None


@dataclass
class BlockCall:
    """One batch's call of a block: positional and keyword arguments, hidden states first."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: Tensor) -> "BlockCall":
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})

    def to(self, device: torch.device) -> "BlockCall":
        """The same call with every tensor on ``device`` (host copies pinned, so that moving back overlaps)."""
        return BlockCall(_mapped(self.args, lambda t: _placed(t, device)), _mapped(self.kwargs, lambda t: _placed(t, device)))

    def nbytes(self) -> int:
        """Bytes of the call's tensors (what keeping it costs)."""
        return sum(t.numel() * t.element_size() for t in _tensors((self.args, self.kwargs)))


def find_stack(model: nn.Module, layer_names: list[str]) -> BlockStack | None:
    """The ModuleList of same-class blocks that holds the most of ``layer_names`` (None when none holds two)."""
    best: tuple[int, BlockStack] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        stack = BlockStack(name, module)
        covered = sum(stack.index_of(layer) is not None for layer in layer_names)
        if covered >= 2 and (best is None or covered > best[0]):
            best = (covered, stack)
    return best[1] if best else None


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def capture_inputs(
    model: nn.Module, stack: BlockStack, batches: list[Tensor], device: torch.device, keep_graph: bool = False,
    home_for: Callable[[int], torch.device] | None = None,
) -> list[BlockCall]:
    """Each batch's arguments to the first block, produced by what runs before it (on ``device``); ``keep_graph``:
    with autograd on and the hidden states attached to it (a backward pass continues into the embeddings).
    ``home_for(bytes of one call)``: where to keep the calls (``state_placement``), asked as each is captured."""
    calls: list[BlockCall] = []

    def keep(module, args, kwargs):
        call = BlockCall(args, kwargs) if keep_graph else BlockCall(_detached(args), _detached(kwargs))
        home = None if home_for is None else home_for(call.nbytes())
        calls.append(call if home is None or _same_device(call.hidden.device, home) else call.to(home))
        raise _Stop

    handle = stack.blocks[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with outside_on(model, stack, device), torch.set_grad_enabled(keep_graph):
            for batch in batches:
                try:
                    call_model(model, batch.to(device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise RuntimeError(f"the first block of {stack.prefix} ran {len(calls)} times for {len(batches)} batches")
    return calls


@dataclass
class BlockRun:
    """A block's output hidden states per call, and whether it answers with a tuple (GPT-2, BERT) or a tensor."""

    outputs: list[Tensor]
    as_tuple: bool


def run_block(block: nn.Module, calls: list[BlockCall], after_call: Callable[[], None] | None = None,
              run_on: torch.device | None = None) -> BlockRun:
    """Call ``block`` on every captured call: on the calls' device, or on ``run_on`` with each call moved there and its
    output moved back where the call was kept (calibration states kept in host memory, ``fit.state_placement``)."""
    outputs, as_tuple = [], False
    with torch.no_grad():
        for call in calls:
            home = call.hidden.device
            if run_on is not None and not _same_device(home, run_on):
                call = call.to(run_on)
            out = block(*call.args, **call.kwargs)
            as_tuple = isinstance(out, (tuple, list))
            hidden = out[0] if as_tuple else out
            outputs.append(_placed(hidden, home))
            if after_call is not None:
                after_call()
    return BlockRun(outputs, as_tuple)


def replay_tail(
    model: nn.Module,
    stack: BlockStack,
    batches: list[Tensor],
    last_run: BlockRun,
    device: torch.device,
    on_output: Callable[[int, Any], None] | None = None,
    with_grad: bool = False,
) -> None:
    """Run the model on each batch with every block stubbed: the last one returns ``finals[i]``.

    Hooks the caller placed on modules after the stack (the head) see the states the real blocks
    made (``last_run``: the last block's outputs); ``on_output(i, output)`` receives the model's
    output for batch i; ``with_grad``: autograd on (the output's gradient flows back to ``last_run``).
    """
    state = {"batch": 0}
    originals = list(stack.blocks)
    last = len(originals) - 1

    def stub(index: int) -> nn.Module:
        answer = (lambda hidden: last_run.outputs[state["batch"]].to(hidden.device)) if index == last else (lambda hidden: hidden)
        return _Stub(answer, last_run.as_tuple)

    for index in range(len(originals)):
        stack.blocks[index] = stub(index)
    # nobody wants the outputs: stop at the head, once hooks placed before this one have seen its input
    # (the logits of a 50k-token vocabulary are most of a tail's cost, on a CPU tens of seconds a pass)
    head = model.get_output_embeddings() if on_output is None and hasattr(model, "get_output_embeddings") else None
    stopper = head.register_forward_pre_hook(_stop) if isinstance(head, nn.Module) else None
    try:
        with outside_on(model, stack, device), torch.set_grad_enabled(with_grad):
            for i, batch in enumerate(batches):
                state["batch"] = i
                try:
                    output = call_model(model, batch.to(device))
                except _HeadReached:
                    continue
                if on_output is not None:
                    on_output(i, output)
    finally:
        if stopper is not None:
            stopper.remove()
        for index, block in enumerate(originals):
            stack.blocks[index] = block


class _HeadReached(Exception):
    """Raised by the head's pre-hook to end a tail whose output nobody reads."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _HeadReached


class _Stub(nn.Module):
    def __init__(self, answer: Callable[[Tensor], Tensor], as_tuple: bool) -> None:
        super().__init__()
        self.answer, self.as_tuple = answer, as_tuple

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        out = self.answer(hidden_states)
        return (out,) if self.as_tuple else out


def call_model(model: nn.Module, ids: Tensor) -> Any:
    """``model(input_ids=ids)`` without a KV cache, for models whose forward takes ``use_cache`` and those that do not."""
    try:
        return model(input_ids=ids, use_cache=False)
    except TypeError as error:
        if "use_cache" not in str(error):
            raise
        return model(input_ids=ids)


@contextlib.contextmanager
def outside_on(model: nn.Module, stack: BlockStack, device: torch.device) -> Iterator[None]:
    """Every parameter and buffer outside the stack on ``device`` for the duration; back where it was after."""
    head = f"{stack.prefix}." if stack.prefix else ""
    moved: list[tuple[Tensor, torch.device]] = []
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name.startswith(head) or id(tensor) in seen or _same_device(tensor.device, device):
            continue
        seen.add(id(tensor))
        moved.append((tensor, tensor.device))
        tensor.data = tensor.data.to(device)
    invalidate_all()  # launch plans kept by the layers hold these tensors
    try:
        yield
    finally:
        for tensor, where in moved:
            tensor.data = tensor.data.to(where)
        invalidate_all()


def _detached(value: Any) -> Any:
    """Tensors of a captured call, detached (a cache object or a plain value passes as it is)."""
    return _mapped(value, Tensor.detach)


def _mapped(value: Any, change: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``change`` applied to every tensor in it (through tuples, lists and dicts; anything else as is)."""
    if isinstance(value, Tensor):
        return change(value)
    if isinstance(value, tuple):
        return tuple(_mapped(v, change) for v in value)
    if isinstance(value, list):
        return [_mapped(v, change) for v in value]
    if isinstance(value, dict):
        return {k: _mapped(v, change) for k, v in value.items()}
    return value


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in ``value`` (through tuples, lists and dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` alike where 0 is the current device: the same memory, nothing to move."""
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    if a.type != "cuda":
        return False  # a move is then a no-op .to(), never a wrong result
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _placed(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``; a copy from a GPU into host memory is pinned (the copy back is asynchronous)."""
    if _same_device(tensor.device, device):
        return tensor
    if device.type == "cpu" and tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor)
    return tensor.to(device, non_blocking=tensor.is_pinned())
