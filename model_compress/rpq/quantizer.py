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
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .modules import KIND_TIED_HEAD, build_rpq_module
from .fusions.glu import fuse_gated_mlps
from .fusions.norm import defer_norms
from .fusions.shared_input import group_shared_inputs

QUANT_METHOD = "rpq"


class RPQConfig(QuantizationConfigMixin):
    """The ``quantization_config`` section of an RPQ checkpoint.

    ``layers`` maps a module name to {kind, shape, num_codebooks, codebook_size, codebook_dtype[, tied_to]};
    ``dense`` maps the supported layers left dense to the reason; ``base_model`` says where the
    original came from (for ``compress eval``); ``bits`` is the budget asked for (None with fixed
    ``num_codebooks`` / ``codebook_size``); the rest records the user's settings and the tool.
    """

    def __init__(
        self,
        layers: dict[str, dict[str, Any]] | None = None,
        bits: float | None = None,
        num_codebooks: int | None = None,
        codebook_size: int | None = None,
        codebook_bits: int | None = None,
        skip: list[str] | None = None,
        dense: dict[str, str] | None = None,
        fit: dict[str, Any] | None = None,
        tool: dict[str, str] | None = None,
        base_model: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.layers = layers or {}
        self.bits = bits
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.codebook_bits = codebook_bits
        self.skip = skip or []
        self.dense = dense or {}
        self.fit = fit or {}
        self.tool = tool or {}
        self.base_model = base_model or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "codebook_bits": self.codebook_bits,
            "skip": list(self.skip),
            "fit": dict(self.fit),
            "tool": dict(self.tool),
            "base_model": dict(self.base_model),
            "dense": dict(self.dense),
            "layers": {name: dict(spec) for name, spec in self.layers.items()},
        }


class LoaderOnlyQuantizer(HfQuantizer):
    """A quantizer that only loads: its modules are swapped in before the weights are read (by the
    subclass), and afterwards every tensor of the modules named by ``loaded_names`` must have arrived."""

    requires_calibration = True

    def loaded_names(self) -> Any:
        raise NotImplementedError

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        check_all_loaded(model, self.loaded_names())

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


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
        group_shared_inputs(model)
        defer_norms(model)
        fuse_gated_mlps(model)


def check_all_loaded(model: nn.Module, names: Any) -> None:
    """Every tensor of the swapped-in modules came from the checkpoint (none left on the meta device)."""
    for name in names:
        module = model.get_submodule(name)
        for tensor_name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.device.type == "meta":
                raise ValueError(f"checkpoint has no {name}.{tensor_name}: the file is incomplete")


def swap_in_rpq_modules(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace each named layer by an empty RPQ module of the recorded kind, M and K (embeddings first)."""
    ordered = sorted(layers.items(), key=lambda item: item[1]["kind"] == KIND_TIED_HEAD)
    for name, spec in ordered:
        original = model.get_submodule(name)
        tied = model.get_submodule(spec["tied_to"]) if spec["kind"] == KIND_TIED_HEAD else None
        module = build_rpq_module(
            original, spec["kind"], spec["num_codebooks"], spec["codebook_size"], tied, spec.get("codebook_dtype")
        )
        model.set_submodule(name, module)


def skip_dense_initialisation(model: nn.Module, names: Any) -> None:
    """Keep transformers' weight initialisation away from RPQ modules.

    After loading, transformers runs ``_init_weights`` on every module not flagged initialised, and
    that code reads ``module.weight`` of anything that is an nn.Embedding (RPQEmbedding is one), or,
    for GPT-2, ``mlp.c_proj.weight`` from the parent. RPQ modules have no dense weight: their
    tensors all come from the checkpoint, which ``_process_model_after_weight_loading`` verifies. Their
    parents are flagged too where they hold no tensors of their own, so nothing else is skipped.
    """
    for name in names:
        model.get_submodule(name)._is_hf_initialized = True
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        own_tensors = list(parent.parameters(recurse=False)) + list(parent.buffers(recurse=False))
        if not own_tensors:
            parent._is_hf_initialized = True


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


def mark_quantized(model: nn.Module, config: QuantizationConfigMixin, quantizer: HfQuantizer, method: str) -> None:
    """What transformers sets on a model it loaded through ``quantizer``; save_pretrained then writes ``config``."""
    model.config.quantization_config = config
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = method


def register_method(method: str, config_class: type, quantizer_class: type) -> None:
    """Add a quantization method to transformers' registry (idempotent)."""
    if method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(method)(config_class)
    if method not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(method)(quantizer_class)


def register() -> None:
    """Add RPQ to transformers' quantization registry (idempotent)."""
    register_method(QUANT_METHOD, RPQConfig, RPQHfQuantizer)
