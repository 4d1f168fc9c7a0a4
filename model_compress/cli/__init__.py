"""The `compress` command line (``app``) and its entry point (``main``)."""

from .app import app, main

__all__ = ["app", "main"]
