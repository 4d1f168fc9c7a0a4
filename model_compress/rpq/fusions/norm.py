"""The norm in front of q/k/v (gate/up, fc1) applied inside the one-token RPQ kernel instead of by its own kernels.

A batch-1 decode step is a chain of small kernels, each paying a launch and a round trip through
memory: HF's eager RMSNorm alone is seven of them (cast, square, mean, add, rsqrt, multiply,
multiply), LayerNorm one. The binned kernel gathers x anyway; given the norm's input it takes the
statistics itself (a few KB from L2 per program) and gathers the norm weight beside x, so the
normalised activations never exist. LayerNorm's bias goes into each consumer's bias once, at load:
W (gamma * x_hat + beta) = W (gamma * x_hat) + W beta.

Only where the structure is known, so that nothing but RPQ Linears reads the norm's output
(transformers' pre-norm decoder layers listed below, whose norm output goes to the attention
projections or the first MLP projections and nowhere else). There the norm module passes its input
through, and each consumer normalises it: in the kernel on the binned route, otherwise by calling
the norm's own forward (once per input tensor, shared by its consumers), so every other path
computes exactly what the original model did. Nothing is saved with the model; state dict and
parameters are unchanged. ``MODEL_COMPRESS_FUSED_NORM=0`` leaves the norms alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..kernels import forward as kernels
from .once import OncePerInput
from ..layers.modules import RPQLinear
from ..kernels.config.norm_spec import LAYER_NORM, RMS_NORM, NormSpec
from ..kernels.config import options

# Decoder layers (class names) whose pre-norms feed only RPQ-able projections: norm -> consumer attribute paths.
PRE_NORM_LAYERS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    name: (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    for name in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
}
PRE_NORM_LAYERS["OPTDecoderLayer"] = (
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("final_layer_norm", ("fc1",)),
)
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x / sqrt(mean(x^2) + eps)


class DeferredNorm:
    """One norm whose output only RPQ Linears read: the module now returns its input, the consumers normalise."""

    def __init__(self, spec: NormSpec, forward: Callable[[Tensor], Tensor], consumers: int) -> None:
        self.spec = spec
        self.consumers = consumers
        self._once = OncePerInput(forward, consumers)  # the module's own forward, for every path that does not fuse

    def normalized(self, x: Tensor) -> Tensor:
        """The norm's output for ``x``: computed by the first consumer, kept only until the others took it."""
        return self._once(x)

    @property
    def holding(self) -> bool:
        return self._once.holding


class NormedInput:
    """What an RPQ Linear behind a deferred norm needs: the norm, and (for the kernel) its bias plus W beta."""

    def __init__(self, norm: DeferredNorm, layer: RPQLinear, beta: Tensor | None) -> None:
        self.norm = norm
        self.beta = beta
        self._layer = layer
        self._cached: tuple[tuple, Tensor | None] | None = None

    @property
    def fused_bias(self) -> Tensor | None:
        """The layer's bias plus W beta, made on first use on the layer's device and dtype, again if those change."""
        layer, beta = self._layer, self.beta
        if beta is None:
            return layer.bias
        parts = [layer.codebooks, layer.indices, beta] + ([layer.bias] if layer.bias is not None else [])
        key = tuple((t.data_ptr(), t.device, t.dtype, t._version) for t in parts)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                term = kernels.linear_histogram(beta.float()[None], layer.codebooks.float(), layer.indices, None)[0]
                bias = term if layer.bias is None else term + layer.bias.float()
            self._cached = (key, bias.to(layer.codebooks.dtype))
        return self._cached[1]


def _norm_spec(module: nn.Module) -> NormSpec | None:
    """The kernel's description of a norm module, or None for a norm it does not reproduce."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return NormSpec(weight, float(module.eps), LAYER_NORM)
    if type(module).__name__ in RMS_NORM_CLASSES and isinstance(getattr(module, "variance_epsilon", None), float):
        return NormSpec(weight, module.variance_epsilon, RMS_NORM)
    return None


def known_pre_norms(model: nn.Module) -> Iterator[tuple[nn.Module, list[nn.Module | None], NormSpec | None]]:
    """Each pre-norm of a known decoder layer of ``model``, the modules that read its output, and its kernel spec (None
    for a norm the kernels do not reproduce). Post-norm OPT is skipped: there the norm's output is the residual."""
    for layer in model.modules():
        for norm_name, consumer_paths in PRE_NORM_LAYERS.get(type(layer).__name__, ()):
            if type(layer).__name__ == "OPTDecoderLayer" and not getattr(layer, "do_layer_norm_before", False):
                continue
            norm = getattr(layer, norm_name, None)
            if norm is not None:
                yield norm, [_submodule(layer, path) for path in consumer_paths], _norm_spec(norm)


def defer_norms(model: nn.Module) -> int:
    """Give the consumers of every known pre-norm a DeferredNorm and make the norm pass its input; returns how many."""
    if not options.current().fused_norm:
        return 0
    deferred = 0
    for module, consumers, spec in known_pre_norms(model):
        if spec is None or not all(isinstance(c, RPQLinear) and c.native and c.in_features == spec.weight.numel() for c in consumers):
            continue
        norm = DeferredNorm(spec, module.forward, len(consumers))
        beta = getattr(module, "bias", None) if spec.kind == LAYER_NORM else None
        for consumer in consumers:
            consumer.__dict__["_normed_input"] = NormedInput(norm, consumer, beta)
        module.forward = _pass_through
        deferred += 1
    return deferred


def _pass_through(x: Tensor) -> Tensor:
    return x


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
