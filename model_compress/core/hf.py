"""What every method's transformers integration shares: a quantizer that only loads, and the registration.

transformers lets a library add a quantization method (``register_quantization_config`` /
``register_quantizer``). Ours are loaders only: before the weights are read, a method's quantizer swaps its
empty modules in where the config names them, so that the checkpoint's tensors land in them; afterwards
every tensor must have arrived.
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


class MethodConfig(QuantizationConfigMixin):
    """What every method's ``quantization_config`` records beside its own fields: how the fit ran (``fit``), which
    tool wrote it (``tool``) and where the original came from (``base_model``, what ``compress eval`` and
    ``load_original`` read). A method subclass sets ``QUANT_METHOD`` and adds its fields."""

    QUANT_METHOD = ""

    def __init__(self, fit: dict[str, Any] | None = None, tool: dict[str, str] | None = None, base_model: dict[str, Any] | None = None) -> None:
        self.quant_method = self.QUANT_METHOD
        self.fit = fit or {}
        self.tool = tool or {}
        self.base_model = base_model or {}

    def provenance(self) -> dict[str, Any]:
        """The shared fields as plain dicts, for a subclass's ``to_dict``."""
        return {"fit": dict(self.fit), "tool": dict(self.tool), "base_model": dict(self.base_model)}


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


def check_all_loaded(model: nn.Module, names: Any) -> None:
    """Every tensor of the swapped-in modules came from the checkpoint (none left on the meta device)."""
    for name in names:
        module = model.get_submodule(name)
        for tensor_name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.device.type == "meta":
                raise ValueError(f"checkpoint has no {name}.{tensor_name}: the file is incomplete")


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


def mark_quantized(model: nn.Module, config: QuantizationConfigMixin, quantizer: HfQuantizer, method: str) -> None:
    """What transformers sets on a model it loaded through ``quantizer``; save_pretrained then writes ``config``."""
    model.config.quantization_config = config
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = method


def register_with_transformers(method: str, config_class: type, quantizer_class: type) -> None:
    """Add a quantization method to transformers' registry (idempotent)."""
    if method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(method)(config_class)
    if method not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(method)(quantizer_class)
