"""Finding a model's feed-forward blocks, reading their weights, and putting an FFF tree in their place.

A block is the function hidden -> hidden between the model's residual stream and its output
projection; residual adds, dropouts and layer norms stay where the model has them. The layouts:

| layout | families | FF function | the tree goes to | made pass-through |
|---|---|---|---|---|
| llama | Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo, StableLM | down(act(gate x) * up x) | ``mlp`` | - |
| phi3 | Phi-3 | down(act(gate x) * up x), gate and up as one ``gate_up_proj`` | ``mlp`` | - |
| bert | BERT, RoBERTa, ELECTRA | output.dense(act(intermediate.dense x)) | ``intermediate.dense`` | the activation, ``output.dense`` |
| opt | OPT, Phi | fc2(act(fc1 x)) | ``fc1`` | ``activation_fn``, ``fc2`` |
| gpt2 | GPT-2 (Conv1D), Starcoder2 (Linear) | c_proj(act(c_fc x)) | ``c_fc`` | ``act``, ``c_proj`` |
| gptj | GPT-J | fc_out(act(fc_in x)) | ``fc_in`` | ``act``, ``fc_out`` |
| neox | GPT-NeoX, Falcon | dense_4h_to_h(act(dense_h_to_4h x)) | ``dense_h_to_4h`` | ``act``, ``dense_4h_to_h`` |
| distilbert | DistilBERT | lin2(activation(lin1 x)) | ``lin1`` | ``activation``, ``lin2`` |

A projection stored as transformers' Conv1D (in, out) is told by its type, not by the layout.
Mixture-of-experts blocks and encoder-decoder models are refused before the weights load
(``refuse_unsupported``).

Placing the tree at the input projection keeps BERT's ``output`` (dropout, residual, LayerNorm),
OPT's dropouts and GPT-2's ``mlp.dropout`` in the model's own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.errors import UserError

SUPPORTED = (
    "Llama-style (gate_proj / up_proj / down_proj), Phi-3 (gate_up_proj / down_proj), BERT (intermediate.dense / output.dense), "
    "OPT and Phi (fc1 / fc2), GPT-2 and Starcoder2 (c_fc / c_proj), GPT-J (fc_in / fc_out), GPT-NeoX and Falcon "
    "(dense_h_to_4h / dense_4h_to_h), DistilBERT (lin1 / lin2)"
)


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
    fused_gate: bool = False  # ``input`` holds the gate's rows, then the up projection's (Phi-3's gate_up_proj)


LAYOUTS = (
    Layout("llama", "up_proj", "gate_proj", "down_proj", "act_fn", "", ()),
    Layout("bert", "intermediate.dense", None, "output.dense", "intermediate.intermediate_act_fn", "intermediate.dense",
           ("intermediate.intermediate_act_fn", "output.dense")),
    Layout("opt", "fc1", None, "fc2", "activation_fn", "fc1", ("activation_fn", "fc2")),
    Layout("gpt2", "c_fc", None, "c_proj", "act", "c_fc", ("act", "c_proj")),
    Layout("phi3", "gate_up_proj", None, "down_proj", "activation_fn", "", (), fused_gate=True),
    Layout("gptj", "fc_in", None, "fc_out", "act", "fc_in", ("act", "fc_out")),
    Layout("neox", "dense_h_to_4h", None, "dense_4h_to_h", "act", "dense_h_to_4h", ("act", "dense_4h_to_h")),
    Layout("distilbert", "lin1", None, "lin2", "activation", "lin1", ("activation", "lin2")),
)
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


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
        return self.project(self.neuron_activations(x))

    def project(self, activations: torch.Tensor) -> torch.Tensor:
        """The block's output from its neurons' activations (the second half of ``forward``)."""
        out = activations @ self.w_out
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


def _stored_transposed(projection: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as (in, out); nn.Linear as (out, in)."""
    return isinstance(projection, Conv1D)


def _rows(projection: nn.Module) -> torch.Tensor:
    """The projection's weight as (its outputs, its inputs), detached, in float32."""
    weight = projection.weight.detach().float()
    return weight.T if _stored_transposed(projection) else weight


def _bias(projection: nn.Module) -> torch.Tensor | None:
    return projection.bias.detach().float() if getattr(projection, "bias", None) is not None else None


def dense_weights(model: nn.Module, block: Block) -> DenseWeights:
    """The block's weights, detached, in float32 (the tree is fitted in float32), neuron-major."""
    owner = model.get_submodule(block.owner)
    layout = block.layout
    up, down = _get(owner, layout.input), _get(owner, layout.output)
    w_in, b_in = _rows(up), _bias(up)
    w_gate = _rows(_get(owner, layout.gate)) if layout.gate else None
    if layout.fused_gate:  # Phi-3: gate, up = gate_up_proj(x).chunk(2, dim=-1)
        if b_in is not None and b_in.chunk(2)[0].abs().max() > 0:
            raise UserError(f"{block.input_name}: a fused gate projection with a gate bias is not supported")
        w_gate, w_in = w_in.chunk(2)
        b_in = b_in.chunk(2)[1] if b_in is not None else None
    return DenseWeights(
        w_in=w_in.contiguous(),
        b_in=b_in,
        w_gate=w_gate.contiguous() if w_gate is not None else None,
        w_out=_rows(down).T.contiguous(),
        b_out=_bias(down),
        activation=_get(owner, layout.activation),
    )


def install_tree(model: nn.Module, block: Block, tree: nn.Module) -> None:
    """Put ``tree`` in the block's place and turn the parts it absorbed into pass-throughs."""
    for part in block.layout.passthrough:
        model.set_submodule(block.path(part), PassThrough())
    model.set_submodule(block.replaced_name, tree)


@contextlib.contextmanager
def swapped(model: nn.Module, block: Block, tree: nn.Module) -> Iterator[None]:
    """``tree`` in the block's place for the duration of a ``with`` block, the original parts put back after."""
    names = [block.replaced_name, *(block.path(part) for part in block.layout.passthrough)]
    kept = {name: model.get_submodule(name) for name in names}
    install_tree(model, block, tree)
    try:
        yield
    finally:
        for name, module in kept.items():
            model.set_submodule(name, module)


def block_activation(model: nn.Module, block: Block) -> nn.Module:
    return _get(model.get_submodule(block.owner), block.layout.activation)


def hidden_size(model: nn.Module, block: Block) -> int:
    """The width of the block's input (the model's hidden size), without copying weights."""
    projection = _get(model.get_submodule(block.owner), block.layout.input)
    return projection.weight.shape[0 if _stored_transposed(projection) else 1]


def intermediate_size(model: nn.Module, block: Block) -> int:
    """The block's neuron count (the dense intermediate width)."""
    projection = _get(model.get_submodule(block.owner), block.layout.input)
    rows = projection.weight.shape[1 if _stored_transposed(projection) else 0]
    return rows // 2 if block.layout.fused_gate else rows


def refuse_unsupported(config) -> None:
    """One line, from the config alone (before the weights load), for models whose FF blocks are not dense MLPs."""
    model_type = getattr(config, "model_type", "this model")
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model type {model_type}: encoder-decoder models are not supported; distil a decoder-only or encoder-only model")
    experts = next((getattr(config, name) for name in EXPERT_COUNTS if getattr(config, name, None)), None)
    if experts:
        raise UserError(
            f"model type {model_type}: its feed-forward blocks are mixtures of {experts} experts, already routed per token; "
            "fff-distill converts dense feed-forward blocks only"
        )


def timing_spans(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(first module, last module) of every FF block or tree, for timing the blocks inside a forward.

    A tree is its own span; a dense block runs from where a tree would go to its output projection
    (a Llama ``mlp`` is both: its gate runs before its up projection).
    """
    from .tree import FastFeedForward

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
