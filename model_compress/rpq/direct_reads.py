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

from torch import nn

CHILD_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b")


@functools.cache
def children_whose_weight_is_read(cls: type) -> frozenset[str]:
    """Attribute names ``c`` such that a ``forward`` in ``cls``'s method order reads ``self.c.weight``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue
        forward = klass.__dict__.get("forward")
        if forward is None:
            continue
        try:
            source = inspect.getsource(forward)
        except (OSError, TypeError):  # compiled or generated: nothing to read
            continue
        names.update(CHILD_WEIGHT_READ.findall(source))
    return frozenset(names)


def weights_read_directly(model: nn.Module) -> dict[str, str]:
    """Qualified name -> why, for every child module whose parent's forward reads its ``.weight``."""
    reads: dict[str, str] = {}
    for name, module in model.named_modules():
        for child in children_whose_weight_is_read(type(module)):
            if isinstance(getattr(module, child, None), nn.Module):
                qualified = f"{name}.{child}" if name else child
                reads[qualified] = f"{type(module).__name__}.forward reads {child}.weight directly"
    return reads
