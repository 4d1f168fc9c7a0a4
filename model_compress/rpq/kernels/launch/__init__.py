"""How the packed kernels are launched (``direct_launch``): a package of its own, importable without Triton and
without the kernels, so that ``kernels/packed`` and the CPU tests can both import it."""
