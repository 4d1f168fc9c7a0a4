"""The RPQ forward paths: torch reference forms, the route table, the Triton kernels."""
