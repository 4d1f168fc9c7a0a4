"""Finding a model's feed-forward blocks, reading their weights, and putting an FFF tree in their place.

A block is the function hidden -> hidden between the model's residual stream and its output
projection; residual adds, dropouts and layer norms stay where the model has them. Four layouts:

| layout | where | FF function | the tree goes to | made pass-through |
|---|---|---|---|---|
| llama (Llama, SmolLM, Mistral, Qwen2...) | ``mlp`` | down(act(gate x) * up x) | ``mlp`` | - |
| bert | ``layer`` | output.dense(act(intermediate.dense x)) | ``intermediate.dense`` | the activation, ``output.dense`` |
| opt | ``layer`` | fc2(act(fc1 x)) | ``fc1`` | ``activation_fn``, ``fc2`` |
| gpt2 | ``mlp`` | c_proj(act(c_fc x)) | ``c_fc`` | ``act``, ``c_proj`` |

Placing the tree at the input projection keeps BERT's ``output`` (dropout, residual, LayerNorm),
OPT's dropouts and GPT-2's ``mlp.dropout`` in the model's own forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

SUPPORTED = "BERT (intermediate.dense / output.dense), Llama-style (gate_proj / up_proj / down_proj), OPT (fc1 / fc2), GPT-2 (c_fc / c_proj)"


class PassThrough(nn.Identity):
    """Stands where a block's activation or output projection was, now computed inside the tree."""


@dataclass(frozen=True)
class Layout:
    """Attribute paths, relative to the block's owner module, of one architecture's FF block."""

    name: str
    input: str  # the projection whose input is the block's input
    gate: str | None  # the gated branch (Llama), if any
    output: str  # the projection whose output is the block's output
    activation: str
    replaced: str  # where the tree goes ("" = the owner itself)
    passthrough: tuple[str, ...]
    transposed: bool = False  # GPT-2's Conv1D stores (in, out)


LAYOUTS = (
    Layout("llama", "up_proj", "gate_proj", "down_proj", "act_fn", "", ()),
    Layout("bert", "intermediate.dense", None, "output.dense", "intermediate.intermediate_act_fn", "intermediate.dense",
           ("intermediate.intermediate_act_fn", "output.dense")),
    Layout("opt", "fc1", None, "fc2", "activation_fn", "fc1", ("activation_fn", "fc2")),
    Layout("gpt2", "c_fc", None, "c_proj", "act", "c_fc", ("act", "c_proj"), transposed=True),
)


@dataclass(frozen=True)
class Block:
    """One FF block found in a model: its owner's name, the layout, and its layer index."""

    owner: str
    layout: Layout
    index: int

    def path(self, relative: str) -> str:
        return ".".join(part for part in (self.owner, relative) if part)

    @property
    def input_name(self) -> str:
        return self.path(self.layout.input)

    @property
    def output_name(self) -> str:
        return self.path(self.layout.output)

    @property
    def replaced_name(self) -> str:
        return self.path(self.layout.replaced)

    def to_json(self) -> dict:
        return {"owner": self.owner, "layout": self.layout.name, "index": self.index, "replaced": self.replaced_name}


@dataclass
class DenseWeights:
    """A block's weights in neuron-major form: in / gate (width, hidden), out (width, hidden)."""

    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_gate: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    activation: nn.Module

    @property
    def width(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_in.shape[1]

    def neuron_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, width): what each neuron passes to the output projection."""
        pre = x @ self.w_in.T
        if self.b_in is not None:
            pre = pre + self.b_in
        return self.activation(x @ self.w_gate.T) * pre if self.w_gate is not None else self.activation(pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.neuron_activations(x) @ self.w_out
        return out + self.b_out if self.b_out is not None else out


def find_blocks(model: nn.Module) -> list[Block]:
    """Every FF block, in module order (one per transformer layer), or a UserError naming what is supported."""
    blocks: list[Block] = []
    for name, module in model.named_modules():
        layout = _layout_of(module)
        if layout is not None:
            blocks.append(Block(name, layout, len(blocks)))
    if not blocks:
        raise UserError(f"no feed-forward blocks recognised in {type(model).__name__}; supported: {SUPPORTED}")
    return blocks


def _layout_of(module: nn.Module) -> Layout | None:
    for layout in LAYOUTS:
        parts = [layout.input, layout.output, layout.activation] + ([layout.gate] if layout.gate else [])
        if all(_has(module, part) for part in parts) and not isinstance(_get(module, layout.output), PassThrough):
            return layout
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        _get(module, path)
    except AttributeError:
        return False
    return True


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def select_blocks(blocks: list[Block], layers: str | None) -> list[Block]:
    """``--layers``: None for all, else a comma list of indices and inclusive ranges ("0-3,6")."""
    if layers is None or layers.strip() in ("", "all"):
        return blocks
    chosen: set[int] = set()
    for part in layers.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"--layers '{layers}': use indices and ranges like 0-3,6")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if first > last or last >= len(blocks):
            raise UserError(f"--layers '{layers}': the model has FF blocks 0-{len(blocks) - 1}")
        chosen.update(range(first, last + 1))
    return [block for block in blocks if block.index in chosen]


def dense_weights(model: nn.Module, block: Block) -> DenseWeights:
    """The block's weights, detached, in float32 (the tree is fitted in float32)."""
    owner = model.get_submodule(block.owner)
    layout = block.layout

    def rows(projection: nn.Module) -> torch.Tensor:  # (neurons, hidden) for in/gate, (neurons, hidden) for out
        weight = projection.weight.detach().float()
        return weight if not layout.transposed else weight.T

    def bias(projection: nn.Module) -> torch.Tensor | None:
        return projection.bias.detach().float() if getattr(projection, "bias", None) is not None else None

    up, down = _get(owner, layout.input), _get(owner, layout.output)
    w_out = down.weight.detach().float()
    return DenseWeights(
        w_in=rows(up),
        b_in=bias(up),
        w_gate=rows(_get(owner, layout.gate)) if layout.gate else None,
        w_out=w_out.T.contiguous() if not layout.transposed else w_out.contiguous(),
        b_out=bias(down),
        activation=_get(owner, layout.activation),
    )


def install_tree(model: nn.Module, block: Block, tree: nn.Module) -> None:
    """Put ``tree`` in the block's place and turn the parts it absorbed into pass-throughs."""
    for part in block.layout.passthrough:
        model.set_submodule(block.path(part), PassThrough())
    model.set_submodule(block.replaced_name, tree)


def block_activation(model: nn.Module, block: Block) -> nn.Module:
    return _get(model.get_submodule(block.owner), block.layout.activation)


def hidden_size(model: nn.Module, block: Block) -> int:
    """The width of the block's input (the model's hidden size), without copying weights."""
    projection = _get(model.get_submodule(block.owner), block.layout.input)
    return projection.weight.shape[0] if block.layout.transposed else projection.weight.shape[1]


def intermediate_size(model: nn.Module, block: Block) -> int:
    """The block's neuron count (the dense intermediate width)."""
    projection = _get(model.get_submodule(block.owner), block.layout.input)
    return projection.weight.shape[1] if block.layout.transposed else projection.weight.shape[0]


def timing_spans(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(first module, last module) of every FF block or tree, for timing the blocks inside a forward.

    A tree is its own span; a dense block runs from where a tree would go to its output projection
    (a Llama ``mlp`` is both: its gate runs before its up projection).
    """
    from .fff import FastFeedForward

    trees = [module for module in model.modules() if isinstance(module, FastFeedForward)]
    if trees:
        return [(tree, tree) for tree in trees]
    try:
        blocks = find_blocks(model)
    except UserError:
        return []
    spans = []
    for block in blocks:
        start = model.get_submodule(block.replaced_name)
        spans.append((start, start if block.layout.replaced == "" else model.get_submodule(block.output_name)))
    return spans
