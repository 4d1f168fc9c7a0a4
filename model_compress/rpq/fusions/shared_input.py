"""RPQ Linears that a model calls one after another on the same tensor (q/k/v, gate/up), run as one launch.

At one token a 2048x2048 RPQ layer is latency-bound: 128 programs, one per SM, each waiting on
its loads. Attention calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` in turn; on the binned route
the first call runs all three in one launch (three times the programs to hide each other's
latency, one launch instead of three) and keeps the other outputs for the calls that follow with
the very same tensor. Any other call computes alone, so a model that calls them differently stays
correct, only not faster. The grouping is by attribute name (the names transformers uses), then
by shape; nothing is saved with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import Tensor, nn

from ..kernels import forward as kernels
from ..layers.modules import RPQLinear
from .once import write_version

SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    """The members' outputs for one input, computed together by the first member called with it."""

    def __init__(self, members: list[RPQLinear]) -> None:
        self.members = members
        self._input: Tensor | None = None
        self._version: int | None = None
        self._pending: dict[int, Tensor] = {}
        self._routes: dict = {}  # the group's route per token count, chosen on its first call

    def output(self, member: RPQLinear, x: Tensor) -> Tensor | None:
        """``member(x)`` if the group can give it (kept from a call on the same tensor, or computed now for all)."""
        if x is self._input and self._version == write_version(x) and id(member) in self._pending:
            return self._pending.pop(id(member))
        self._input, self._pending = None, {}
        normed = [m.__dict__.get("_normed_input") for m in self.members]  # fused_norm: x is the norm's input
        norms = {id(n.norm) if n is not None else None for n in normed}
        if len(norms) > 1:
            return None  # members behind different norms (or only some behind one): each computes alone
        members = [(m.codebooks, m.code_bins, m.bias if n is None else n.fused_bias) for m, n in zip(self.members, normed)]
        norm = None if normed[0] is None else normed[0].norm.spec
        outputs = kernels.linear_group_forward(x, members, norm, routes=self._routes)
        if outputs is None:
            return None
        self._input, self._version = x, write_version(x)
        self._pending = {id(m): out for m, out in zip(self.members, outputs) if m is not member}
        return outputs[self.members.index(member)]


def sibling_sets(model: nn.Module, accepts: Callable[[RPQLinear], bool],
                 together: Callable[[RPQLinear, RPQLinear], bool]) -> Iterator[list[RPQLinear]]:
    """Each set of two or more sibling RPQ Linears (``SIBLING_NAMES`` of one parent) that ``accepts`` takes and that
    ``together`` pairs with the set's first member, in the model's order."""
    for parent in model.modules():
        for names in SIBLING_NAMES:
            sets: list[list[RPQLinear]] = []
            for layer in (getattr(parent, name, None) for name in names):
                if not isinstance(layer, RPQLinear) or not accepts(layer):
                    continue
                match = next((s for s in sets if together(s[0], layer)), None)
                if match is None:
                    sets.append([layer])
                else:
                    match.append(layer)
            yield from (members for members in sets if len(members) > 1)


def group_shared_inputs(model: nn.Module) -> int:
    """Give each set of sibling RPQ Linears of the same shape a SharedInputGroup; returns how many groups."""
    groups = 0
    for members in sibling_sets(model, lambda layer: layer.native, lambda a, b: _shape(a) == _shape(b)):
        group = SharedInputGroup(members)
        for layer in members:
            layer.__dict__["_shared_input"] = group
        groups += 1
    return groups


def _shape(layer: RPQLinear) -> tuple:
    return layer.in_features, tuple(layer.codebooks.shape), layer.bias is not None
