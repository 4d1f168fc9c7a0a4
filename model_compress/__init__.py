"""model-compress: model surgery and compression for PyTorch / Hugging Face transformers.

Importing the package registers the RPQ and FFF methods with transformers, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads a compressed or distilled checkpoint.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("model-compress")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from .core.checkpoint import load  # noqa: E402
from .core.errors import UserError  # noqa: E402
from .rpq.quantizer import register as _register_rpq  # noqa: E402
from .fff.quantizer import register as _register_fff  # noqa: E402

_register_rpq()
_register_fff()

__all__ = ["UserError", "__version__", "load"]
