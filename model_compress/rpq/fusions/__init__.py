"""Fusions of RPQ layers with their neighbours (shared input, pre-norm, SiLU gate), at one token."""
