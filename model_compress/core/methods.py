"""The method registry: what checkpoint, eval and the CLI need from a compression method, without importing it.

Each method (a folder beside ``core``: ``rpq``, ``fff``) has a ``method.py`` that builds its ``Method``
and calls ``register``. ``load_methods`` imports every such module once (the package does it on import),
so a new method is one new folder: nothing in ``core``, ``eval`` or ``cli`` names it, and its
``command`` module brings its `compress` subcommand.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .hf import register_with_transformers

Headers = dict[str, tuple[list[int], str]]  # tensor name -> (shape, safetensors dtype)


@dataclass(frozen=True)
class Method:
    """One method, as the rest of the tool sees it."""

    name: str  # the checkpoint's quantization_config.quant_method
    title: str  # the heading of its summary table
    config_class: type
    quantizer_class: type
    check_tensors: Callable[[dict, Headers], None]  # raises UserError when a tensor the section names is wrong
    describe: Callable[[dict], str]  # one phrase for `compress inspect`: what the section holds
    summary_table: Callable[[dict], tuple[Any, list, list[str]]]  # report summary -> (header, rows, lines under it)
    release_workspaces: Callable[[], None] | None = None  # memory a method keeps between calls, freed between models
    ff_timing_spans: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]] | None = None  # FF blocks, to time them
    # keep each layer's weight decoded beside its codes (plain matrix products, more memory); returns the bytes added
    decode_weights: Callable[[nn.Module, torch.dtype], int] | None = None
    # a head that answers from a shortlist (an index) computes every logit (True) or answers from it again (False)
    full_logits: Callable[[nn.Module, bool], None] | None = None
    # that head answers from a fixed-size shortlist with no host sync, so a CUDA graph captures it (True), or as before
    # (False, which returns {"positions": n, "uncertified": m} counted meanwhile, or None without such a head)
    fixed_shortlists: Callable[[nn.Module, bool], dict | None] | None = None
    # that head's figures on the eval windows (model, windows of token ids, device): a dict, or None without one
    head_figures: Callable[[nn.Module, torch.Tensor, torch.device], dict | None] | None = None
    command: str | None = None  # the module whose add_command(app) puts the method's CLI command on `compress`
    rank: int = 100  # where that command is listed in `compress --help`, lower first


_METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    """Add ``method`` to the registry and to transformers' quantization registry (idempotent)."""
    _METHODS[method.name] = method
    register_with_transformers(method.name, method.config_class, method.quantizer_class)


def load_methods() -> None:
    """Import every ``<package>.method`` module beside ``core`` (each registers itself)."""
    package = __name__.rsplit(".", 2)[0]
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__):
        if info.ispkg and importlib.util.find_spec(f"{package}.{info.name}.method") is not None:
            importlib.import_module(f"{package}.{info.name}.method")


def names() -> tuple[str, ...]:
    return tuple(_METHODS)


def registered() -> list[Method]:
    """Every registered method, by rank (then name)."""
    return sorted(_METHODS.values(), key=lambda method: (method.rank, method.name))


def method_of(section: dict) -> Method:
    """The registered method a ``quantization_config`` section belongs to, or a UserError."""
    name = section.get("quant_method")
    if name not in _METHODS:
        raise UserError(f"unknown method '{name}' (known: {', '.join(_METHODS)})")
    return _METHODS[name]


def release_workspaces() -> None:
    """Free what any method keeps between calls (before another model is measured)."""
    for method in _METHODS.values():
        if method.release_workspaces is not None:
            method.release_workspaces()


def ff_timing_spans(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(first, last) module of every feed-forward block of ``model``, from the first method that finds any."""
    for method in _METHODS.values():
        if method.ff_timing_spans is not None and (spans := method.ff_timing_spans(model)):
            return spans
    return []


def decode_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Every method's layers keep their weight decoded in ``dtype`` beside their codes; the bytes that adds."""
    return sum(method.decode_weights(model, dtype) for method in _METHODS.values() if method.decode_weights is not None)


def full_logits(model: nn.Module, on: bool) -> None:
    """Heads that answer from a shortlist compute every logit (``on``: perplexity needs them all) or answer from it."""
    for method in _METHODS.values():
        if method.full_logits is not None:
            method.full_logits(model, on)


def fixed_shortlists(model: nn.Module, on: bool) -> dict | None:
    """Heads that answer from a shortlist take one of a fixed size, capturable in a CUDA graph (``on``), or go back;
    going back returns the positions answered meanwhile and how many of them were not certified (None: no such head)."""
    counts = None
    for method in _METHODS.values():
        if method.fixed_shortlists is not None:
            found = method.fixed_shortlists(model, on)
            if found is not None:
                counts = found
    return counts


def head_figures(model: nn.Module, windows: torch.Tensor, device: torch.device) -> dict:
    """The figures of any head that answers from a shortlist, measured on ``windows``; {} where none does."""
    figures: dict = {}
    for method in _METHODS.values():
        if method.head_figures is not None:
            figures.update(method.head_figures(model, windows, device) or {})
    return figures
