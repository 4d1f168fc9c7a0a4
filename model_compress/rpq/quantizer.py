"""Registers RPQ with transformers, so ``AutoModel*.from_pretrained(folder)`` loads our checkpoints.

transformers lets a library add a quantization method (``register_quantization_config`` /
``register_quantizer``). Ours is a loader only: before the weights are read, it swaps every layer
named in the config for an empty RPQ module of the recorded shape, so that the ``codebooks`` and
``indices`` tensors in model.safetensors land in them; afterwards it checks that every code arrived.

Ties: where a tied head was converted, the saved config says ``tie_word_embeddings: false`` because
the dense weights it speaks of no longer exist; the RPQ tie (a head reading its embedding's codes)
is recorded per layer here and rebuilt by the swap, so transformers' own tying never touches RPQ
modules. A tie left dense (both ends skipped) stays transformers' to save and restore.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.hf import LoaderOnlyQuantizer, MethodConfig, mark_quantized, skip_dense_initialisation
from .format_upgrade import upgrade_codes
from .fusions import apply_fusions
from .layers.modules import KIND_TIED_HEAD, build_rpq_module

QUANT_METHOD = "rpq"
# The checkpoint layout's version: 1 before input rotations, 2 adds ``rotation_block`` and ``rotation_signs``, 3 stores
# 5-bit codes over a multiple of 32 columns as two planes (``layout.stored_as_planes``; ``format_upgrade`` repacks older).
# A loader reads every version up to its own; a newer one gets one clear line.
FORMAT_VERSION = 3


class RPQConfig(MethodConfig):
    """The ``quantization_config`` section of an RPQ checkpoint.

    ``layers`` maps a module name to {kind, shape, num_codebooks, codebook_size, codebook_dtype[, tied_to]
    [, rotation_block]} (``rotation_block``: the layer's input is rotated, its signs saved with its codes);
    ``dense`` maps the supported layers left dense to the reason; ``base_model`` says where the
    original came from (for ``compress eval``); ``bits`` is the budget asked for (None with fixed
    ``num_codebooks`` / ``codebook_size``); the rest records the user's settings and the tool.
    """

    QUANT_METHOD = QUANT_METHOD

    def __init__(
        self,
        layers: dict[str, dict[str, Any]] | None = None,
        bits: float | None = None,
        num_codebooks: int | None = None,
        codebook_size: int | None = None,
        codebook_bits: int | None = None,
        skip: list[str] | None = None,
        dense: dict[str, str] | None = None,
        rotation: str | None = None,
        rotation_block: int | None = None,
        format_version: int = 1,
        fit: dict[str, Any] | None = None,
        tool: dict[str, str] | None = None,
        base_model: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(fit, tool, base_model)
        self.layers = layers or {}
        self.bits = bits
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.codebook_bits = codebook_bits
        self.skip = skip or []
        self.dense = dense or {}
        self.rotation = rotation
        self.rotation_block = rotation_block
        self.format_version = format_version

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "codebook_bits": self.codebook_bits,
            "rotation": self.rotation,
            "rotation_block": self.rotation_block,
            "format_version": self.format_version,
            "skip": list(self.skip),
            **self.provenance(),
            "dense": dict(self.dense),
            "layers": {name: dict(spec) for name, spec in self.layers.items()},
        }


class RPQHfQuantizer(LoaderOnlyQuantizer):
    """Loads pre-quantized RPQ checkpoints (fitting happens in ``compress rpq``, not in from_pretrained)."""

    quantization_config: RPQConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        swap_in_rpq_modules(model, self.quantization_config.layers)
        skip_dense_initialisation(model, self.quantization_config.layers)
        drop_converted_ties(model, self.quantization_config.layers)

    def loaded_names(self) -> Any:
        return self.quantization_config.layers

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        super()._process_model_after_weight_loading(model, **kwargs)
        upgrade_codes(model, self.quantization_config.format_version)
        self.quantization_config.format_version = FORMAT_VERSION  # the codes in memory are this format's now
        apply_fusions(model)
        source = getattr(model.config, "_name_or_path", "")
        if source and model.get_output_embeddings() is not None:
            from .head_index.attach import attach_stored  # here, not at import: `import model_compress` stays light

            attach_stored(model, source)  # a head index saved beside the weights (``head_index/attach.py``)


def swap_in_rpq_modules(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace each named layer by an empty RPQ module of the recorded kind, M and K (embeddings first)."""
    ordered = sorted(layers.items(), key=lambda item: item[1]["kind"] == KIND_TIED_HEAD)
    for name, spec in ordered:
        original = model.get_submodule(name)
        tied = model.get_submodule(spec["tied_to"]) if spec["kind"] == KIND_TIED_HEAD else None
        module = build_rpq_module(
            original, spec["kind"], spec["num_codebooks"], spec["codebook_size"], tied, spec.get("codebook_dtype"),
            spec.get("rotation_block"),
        )
        model.set_submodule(name, module)


def drop_converted_ties(model: nn.Module, layers: Any) -> bool:
    """Forget transformers' dense tie entries that name an RPQ layer (its weight no longer exists).

    Ties between layers that stayed dense (``--skip lm_head``) are kept, so transformers still
    saves one copy and ties it again on load. Returns True when every tie the model had is now an
    RPQ tie (held by RPQTiedHead), in which case the config's tie flag should say so.
    """
    converted = set(layers)
    ties = getattr(model, "all_tied_weights_keys", None) or {}

    def names_rpq(key: str) -> bool:
        return key.rsplit(".", 1)[0] in converted

    kept = {target: source for target, source in ties.items() if not (names_rpq(target) or names_rpq(source))}
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = kept
    return bool(ties) and not kept


def attach_quantizer(model: nn.Module, config: RPQConfig) -> None:
    """Mark an in-memory converted model as RPQ-quantized, as if it had been loaded, so save_pretrained works.

    Where every tie became an RPQ tie, ``tie_word_embeddings`` is set to false: otherwise code that
    re-derives ties from the config (``model.tie_weights()``, the Trainer) would look for dense weights.
    """
    mark_quantized(model, config, RPQHfQuantizer(config, pre_quantized=True), QUANT_METHOD)
    if drop_converted_ties(model, config.layers):
        for sub_config in (model.config, model.config.get_text_config()):
            if getattr(sub_config, "tie_word_embeddings", False):
                sub_config.tie_word_embeddings = False
