"""One line for an unexpected exception: which module of the model raised it, and what it was.

A model's own code (or ours inside it) can fail deep in a forward: a traceback of forty frames tells a user
less than "model.layers.3.self_attn (LlamaAttention): RuntimeError: ...". The module is read from the
traceback's frames (the innermost ``self`` that is an nn.Module, named within the outermost one), so nothing
has to be registered or hooked on the fast paths.
"""

from __future__ import annotations

import traceback

from torch import nn

from .sources import first_line


def failing_module(error: BaseException) -> str | None:
    """'name (Class)' of the innermost nn.Module whose method raised ``error``; None when no module did."""
    modules: list[nn.Module] = []
    for frame, _ in traceback.walk_tb(error.__traceback__):
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and (not modules or candidate is not modules[-1]):
            modules.append(candidate)
    if not modules:
        return None
    root, innermost = modules[0], modules[-1]
    name = next((name for name, module in root.named_modules() if module is innermost), None)
    kind = type(innermost).__name__
    if name is None:
        return kind
    return f"{name or 'the model'} ({kind})"


def describe_failure(error: BaseException) -> str:
    """The one line the CLI prints for an exception that is not a UserError."""
    what = f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__
    where = failing_module(error)
    place = f" in {where}" if where else ""
    return f"unexpected failure{place}: {what} (run again with --debug for the traceback)"
