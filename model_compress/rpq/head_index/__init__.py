"""A product-quantized index of an LM head: approximate scores of every vocabulary row from small per-subspace tables,
a shortlist re-ranked with the exact rows, and a certificate that no row outside the shortlist can beat the best
exact score, so the greedy token is always the dense argmax (``index``, ``search``, ``module``)."""
