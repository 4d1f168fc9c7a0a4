"""model-compress: model surgery and compression for PyTorch / Hugging Face transformers.

Importing the package registers every method (each folder beside core/ with a method.py: rpq, fff) with
transformers, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads a compressed or distilled checkpoint.
"""

from __future__ import annotations

from .core.checkpoint import load, load_original
from .core.errors import UserError
from .core.methods import load_methods
from .core.version import __version__

load_methods()

__all__ = ["UserError", "__version__", "load", "load_original"]
