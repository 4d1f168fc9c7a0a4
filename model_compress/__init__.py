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

from .checkpoint import load  # noqa: E402
from .errors import UserError  # noqa: E402
from .quantize.hf_integration import register as _register_rpq  # noqa: E402
from .surgery.hf_integration import register as _register_fff  # noqa: E402

_register_rpq()
_register_fff()

__all__ = ["UserError", "__version__", "load"]
