"""SiLU-gated MLPs (Llama, Mistral, Qwen2): ``silu(gate) * up`` formed inside down_proj's one-token kernel.

``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` is, at one token, three small kernels between the
gate/up launch and down_proj's: the activation and the product each read and write the
intermediate vector, and each pays a launch. The binned kernel gathers its input anyway; given gate
and up it gathers both at the same slots and forms silu(gate) * up in registers, so the product
never exists. SmolLM2-135M has 30 such MLPs: 60 fewer launches per decoded token.

Only where the structure is known (the MLP classes below, a SiLU activation, all three
projections RPQ Linears of matching sizes) and only on the route that fuses (CUDA, Triton, the
one-token binned kernel, no hooks on down_proj): every other call runs the original expression,
so CPU and many-token paths compute exactly what the model did. Nothing is saved with the model.
``MODEL_COMPRESS_FUSED_ACT=0`` leaves the MLPs alone.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from ..layers.modules import RPQLinear
from ..kernels.config import options

GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP")  # forward: down_proj(act_fn(gate_proj(x)) * up_proj(x))
SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch's and transformers' (``ACT2FN["silu"]``)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Route every known SiLU-gated MLP of RPQ Linears through ``gated_mlp_forward``; returns how many."""
    if not options.current().fused_glu:
        return 0
    fused = 0
    for mlp in model.modules():
        if type(mlp).__name__ in GATED_MLP_CLASSES and _fusable(mlp):
            mlp.forward = functools.partial(gated_mlp_forward, mlp)
            fused += 1
    return fused


def _fusable(mlp: nn.Module) -> bool:
    """SiLU activation, and gate/up/down all native RPQ Linears (the kernel's form) with down reading what gate and up write."""
    gate, up, down = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    act = getattr(mlp, "act_fn", None)
    return (
        type(act).__name__ in SILU_CLASSES
        and all(isinstance(layer, RPQLinear) and layer.native for layer in (gate, up, down))
        and gate.out_features == up.out_features == down.in_features
    )


def gated_mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """The MLP's own expression, with down_proj taking gate and up itself where its kernel can."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    down = mlp.down_proj
    if not (down._forward_hooks or down._forward_pre_hooks):  # a hook (offloading, tracing) must see down's input
        out = down.gated_forward(gate, up)
        if out is not None:
            return out
    return down(mlp.act_fn(gate) * up)
