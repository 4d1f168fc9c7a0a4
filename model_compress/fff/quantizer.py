"""Registers FFF with transformers, so ``AutoModel*.from_pretrained(folder)`` loads fff-distill checkpoints.

The same mechanism as RPQ (``core/hf.py``): a ``quantization_config`` with
``quant_method: "fff"`` and a loader-only quantizer that, before the weights are read, finds each
recorded FF block in the freshly built model, puts an empty tree of the recorded shape in its place
(with the block's own activation) and turns the absorbed parts into pass-throughs; the tree tensors
in model.safetensors then land in it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.hf import LoaderOnlyQuantizer, MethodConfig, mark_quantized, skip_dense_initialisation
from .blocks import LAYOUTS, Block, block_activation, install_tree
from .tree import FastFeedForward

QUANT_METHOD = "fff"


class FFFConfig(MethodConfig):
    """The ``quantization_config`` section of an FFF checkpoint.

    ``blocks`` maps the tree's module name to {owner, layout, index, hidden, neurons, depth, leaf_width, shared_width,
    leaves_per_token, gated, in_bias, out_bias}; ``settings`` records the user's knobs, ``fit`` the calibration text and
    figures, ``base_model`` where the original came from (for ``compress eval``).
    """

    QUANT_METHOD = QUANT_METHOD

    def __init__(
        self,
        blocks: dict[str, dict[str, Any]] | None = None,
        settings: dict[str, Any] | None = None,
        fit: dict[str, Any] | None = None,
        tool: dict[str, str] | None = None,
        base_model: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(fit, tool, base_model)
        self.blocks = blocks or {}
        self.settings = settings or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "settings": dict(self.settings),
            **self.provenance(),
            "blocks": {name: dict(spec) for name, spec in self.blocks.items()},
        }


def tree_spec(block: Block, tree: FastFeedForward, neurons: int) -> dict[str, Any]:
    """What the loader needs to rebuild ``tree`` in ``block``'s place."""
    return block.to_json() | {
        "hidden": tree.hidden,
        "neurons": neurons,
        "depth": tree.depth,
        "leaf_width": tree.leaf_width,
        "shared_width": tree.shared_width,
        "leaves_per_token": tree.leaves_per_token,
        "gated": tree.gated,
        "in_bias": tree.leaf_in_bias is not None,
        "out_bias": tree.out_bias is not None,
    }


def swap_in_trees(model: nn.Module, blocks: dict[str, dict[str, Any]]) -> None:
    """Replace each recorded block by an empty tree of the recorded shape, in the model's dtype."""
    layouts = {layout.name: layout for layout in LAYOUTS}
    for spec in blocks.values():
        block = Block(spec["owner"], layouts[spec["layout"]], spec["index"])
        like = next(model.get_submodule(block.owner).parameters())  # on the meta device while loading
        tree = FastFeedForward(
            spec["hidden"], spec["depth"], spec["leaf_width"], block_activation(model, block),
            gated=spec["gated"], in_bias=spec["in_bias"], out_bias=spec["out_bias"], shared_width=spec.get("shared_width", 0),
            leaves_per_token=spec.get("leaves_per_token", 1), dtype=like.dtype, device=like.device,
        )
        install_tree(model, block, tree)
        skip_dense_initialisation(model, [block.replaced_name, *(block.path(part) for part in block.layout.passthrough)])


class FFFHfQuantizer(LoaderOnlyQuantizer):
    """Loads fff-distill checkpoints (the distillation happens in `compress fff-distill`)."""

    quantization_config: FFFConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        swap_in_trees(model, self.quantization_config.blocks)

    def loaded_names(self) -> Any:
        return self.quantization_config.blocks


def attach_fff(model: nn.Module, config: FFFConfig) -> None:
    """Mark an in-memory converted model as FFF, as if loaded, so save_pretrained records the section."""
    mark_quantized(model, config, FFFHfQuantizer(config, pre_quantized=True), QUANT_METHOD)
