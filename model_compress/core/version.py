"""The installed package's version, recorded in every checkpoint and report."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("model-compress")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
