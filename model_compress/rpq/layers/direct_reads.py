"""Which layers a model's own code reads the ``.weight`` of, instead of calling them.

An RPQ layer holds codes, not a weight: a parent whose ``forward`` reads ``self.<child>.weight`` (T5's
feed-forward checks ``self.wo.weight.dtype``; ``nn.MultiheadAttention`` passes ``self.out_proj.weight`` to
its functional form) would crash on the replaced child. Those children stay dense, with the reason
recorded in the checkpoint. The source of each class's ``forward`` is read once per class.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterator

from torch import nn

CHILD_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b")


def own_forward_sources(cls: type, stop: tuple[type, ...] = (nn.Module,)) -> Iterator[str | None]:
    """The source of each ``forward`` defined in ``cls``'s method order, up to (not into) a class of ``stop``;
    None for one whose source cannot be read (compiled or generated)."""
    for klass in cls.__mro__:
        if klass in stop or not issubclass(klass, nn.Module):
            break
        forward = klass.__dict__.get("forward")
        if forward is None:
            continue
        try:
            yield inspect.getsource(forward)
        except (OSError, TypeError):
            yield None


@functools.cache
def children_whose_weight_is_read(cls: type) -> frozenset[str]:
    """Attribute names ``c`` such that a ``forward`` in ``cls``'s method order reads ``self.c.weight``."""
    return frozenset(name for source in own_forward_sources(cls) if source for name in CHILD_WEIGHT_READ.findall(source))


def weights_read_directly(model: nn.Module) -> dict[str, str]:
    """Qualified name -> why, for every child module whose parent's forward reads its ``.weight``."""
    reads: dict[str, str] = {}
    for name, module in model.named_modules():
        for child in children_whose_weight_is_read(type(module)):
            if isinstance(getattr(module, child, None), nn.Module):
                qualified = f"{name}.{child}" if name else child
                reads[qualified] = f"{type(module).__name__}.forward reads {child}.weight directly"
    return reads
