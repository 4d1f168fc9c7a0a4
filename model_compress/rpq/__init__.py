"""Reverse product quantization: weights become codebooks plus codes (fitting, modules, kernels, fusions)."""
